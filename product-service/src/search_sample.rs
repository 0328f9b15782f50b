//! How many products a search would match, known before it is run: the
//! words of a few thousand products read from across the catalogue.
//!
//! A full-text engine's cost is its matches: InnoDB computes and ranks the
//! whole match set of a `MATCH … AGAINST` whatever the LIMIT (12–15 s for
//! a word in most of a million products), and neither engine can say how
//! many a query matches without finding them. The sample can: a query that
//! matches 1% of the sampled products matches about 1% of the catalogue.
//! A search the sample says is broad (more than [`SearchBounds::exact_up_to`]
//! matches) is not given to the engine but read as a listing and matched
//! in Rust (`store::broad`), at a cost bounded whatever the catalogue's size.

use std::{
    collections::{BTreeMap, HashSet},
    ops::Bound,
    time::{Duration, Instant},
};

use storegate::db::Backend;

use crate::search::{Indexed, Term, Terms, idf};

/// What bounds one search's cost.
#[derive(Debug, Clone, Copy)]
pub struct SearchBounds {
    /// A search estimated to match at most this many products is run by the
    /// full-text engine, and its `total_size` is exact up to this many;
    /// beyond, it is matched in Rust and its `total_size` is the estimate.
    pub exact_up_to: i64,
    /// Products the estimate is made from.
    pub sample_size: usize,
    /// How long a sample is used before a search takes a new one.
    pub refresh: Duration,
    /// Most products one broad search reads.
    pub rows_read: usize,
    /// A broad search by relevance ranks the matches of one window of the
    /// newest products at a time: this many, or as many as a quarter of
    /// [`Self::rows_read`] products hold.
    pub ranked_matches: usize,
    /// A search one of whose words is in at most this many products may be
    /// anchored on that word (when that reads less than the engine would):
    /// the engine finds its products and Rust keeps those with every word.
    pub anchor_up_to: i64,
    /// What reads cost, weighed against each other; `None`: the measured
    /// costs of the store's backend ([`ReadCosts::of`]).
    pub costs: Option<ReadCosts>,
}

/// What a search's reads cost on one backend, in entries of a word's list
/// read by its full-text engine: what the ways of answering a search are
/// weighed in ([`Sample::route`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadCosts {
    /// A product found by the engine and read by id (an anchored search).
    pub product_by_id: i64,
    /// A product read in an order's index (a broad search).
    pub product_in_order: i64,
}

impl ReadCosts {
    /// The ratios measured at a million products, one caller (BENCHMARKS.md,
    /// "Routing searches by what they read"): InnoDB reads a product the
    /// engine found in the time of about 15 list entries and one in an
    /// index's order in about 3; FTS5 reads a list ten to twenty times as
    /// fast, so a product costs it about 100 and 20 entries.
    pub fn of(backend: Backend) -> ReadCosts {
        match backend {
            Backend::MySql => ReadCosts { product_by_id: 15, product_in_order: 3 },
            Backend::Sqlite => ReadCosts { product_by_id: 100, product_in_order: 20 },
        }
    }
}

impl SearchBounds {
    /// The bounds of a service whose searches may have the engine find
    /// `matches` products (SEARCH_INDEX_MAX_MATCHES): a broad search reads
    /// at most twice that many and ranks a fiftieth of it.
    pub fn for_index_matches(matches: u32) -> SearchBounds {
        let matches = matches.max(1) as usize;
        SearchBounds {
            exact_up_to: matches as i64,
            // A word in 1% of products (10,000 of a million, the default
            // bound) is expected in 50 sampled ones: the estimate is then
            // within about 30% (two standard deviations).
            sample_size: 5_000,
            refresh: Duration::from_secs(60),
            rows_read: 2 * matches,
            // On MySQL each ranked match costs reading products until it
            // is found: 200 of a word in 2% of products, 10,000.
            ranked_matches: (matches / 50).max(1),
            // Each anchor product is read from the table (a random read by
            // primary key on MySQL): a tenth of the engine's bound.
            anchor_up_to: (matches as i64 / 10).max(1),
            costs: None,
        }
    }
}

impl Default for SearchBounds {
    fn default() -> Self {
        SearchBounds::for_index_matches(DEFAULT_INDEX_MATCHES)
    }
}

/// What the sample says a search's terms find.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Estimate {
    /// About how many products of the catalogue have every term.
    pub matches: i64,
    /// About how many have each term: the length of its list in a
    /// full-text index (for a prefix, of all its words' lists merged).
    pub lists: Vec<i64>,
}

/// How one search is answered, and the matches the sample estimates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// By the full-text engine on every word: their lists are short.
    Engine { matches: i64 },
    /// The engine finds the products with the rarest word, `term` (its
    /// position in the query), and Rust keeps those with every word.
    Anchored { term: usize, matches: i64 },
    /// Matched in Rust over a bounded read of the catalogue in the order
    /// asked for (common words, `store::broad`).
    Broad { matches: i64 },
}

impl Route {
    /// The matches the sample estimates.
    pub fn matches(self) -> i64 {
        match self {
            Route::Engine { matches } | Route::Anchored { matches, .. } | Route::Broad { matches } => matches,
        }
    }
}

/// SEARCH_INDEX_MAX_MATCHES unless configured.
pub const DEFAULT_INDEX_MATCHES: u32 = 10_000;

/// Sampled products' words, indexed.
#[derive(Debug)]
pub struct Sample {
    /// The catalogue's size when the sample was taken.
    pub catalogue: i64,
    /// Products sampled.
    products: u32,
    /// Each word and the sampled products that have it, ascending.
    postings: BTreeMap<String, Vec<u32>>,
    /// Indexed words per sampled product, on average.
    pub average_words: f64,
    pub taken: Instant,
}

impl Sample {
    /// The sample of these products' (name, description) from a catalogue
    /// of `catalogue` products.
    pub fn of<'a>(
        catalogue: i64,
        texts: impl IntoIterator<Item = (&'a str, &'a str)>,
        indexed: Indexed,
    ) -> Sample {
        let mut postings = BTreeMap::<String, Vec<u32>>::new();
        let (mut products, mut words_in_all) = (0u32, 0usize);
        for (name, description) in texts {
            let words = indexed.words(name, description);
            words_in_all += words.len();
            for word in words.into_iter().collect::<HashSet<_>>() {
                postings.entry(word).or_default().push(products);
            }
            products += 1;
        }
        let average_words = if products == 0 { 1.0 } else { words_in_all as f64 / f64::from(products) };
        Sample { catalogue, products, postings, average_words, taken: Instant::now() }
    }

    /// The sampled products with `term`, ascending.
    fn having(&self, term: &Term) -> Vec<u32> {
        match term {
            Term::Word(word) => self.postings.get(word).cloned().unwrap_or_default(),
            Term::Prefix(prefix) => {
                let mut having: Vec<u32> = self
                    .postings
                    .range::<str, _>((Bound::Included(prefix.as_str()), Bound::Unbounded))
                    .take_while(|(word, _)| word.starts_with(prefix.as_str()))
                    .flat_map(|(_, products)| products.iter().copied())
                    .collect();
                having.sort_unstable();
                having.dedup();
                having
            }
        }
    }

    /// How many products the sample holds (none for a catalogue small
    /// enough that every search of it is on the index).
    pub fn sampled(&self) -> u32 {
        self.products
    }

    /// About how many products of the catalogue have every term, and each
    /// term alone: each term's products are looked up in the sample once.
    pub fn estimate(&self, terms: &Terms) -> Estimate {
        let mut matching: Option<Vec<u32>> = None;
        let mut lists = Vec::new();
        for term in terms.iter() {
            let having = self.having(term);
            lists.push(self.scale(having.len()));
            matching = Some(match matching {
                None => having,
                Some(so_far) if so_far.is_empty() => so_far,
                Some(so_far) => {
                    let having: HashSet<u32> = having.into_iter().collect();
                    so_far.into_iter().filter(|p| having.contains(p)).collect()
                }
            });
        }
        Estimate { matches: self.scale(matching.map_or(0, |m| m.len())), lists }
    }

    fn scale(&self, sampled: usize) -> i64 {
        if self.products == 0 {
            return 0;
        }
        (sampled as f64 / f64::from(self.products) * self.catalogue as f64).round() as i64
    }

    /// How a search for `terms` on `backend` is answered: the way that
    /// reads least, as the sample estimates what each would read.
    ///
    /// Both engines read the whole list of every word of a query (InnoDB
    /// to intersect them, FTS5 merges a prefix's lists first), so the
    /// engine's cost is their sum, whatever the matches. An anchored search
    /// reads the rarest word's list and each of its products. A broad
    /// search reads at most [`SearchBounds::rows_read`] products in order:
    /// the engine is given no more than that would cost, so that no way's
    /// cost grows with the catalogue.
    pub fn route(&self, terms: &Terms, bounds: &SearchBounds, backend: Backend) -> Route {
        let Estimate { matches, lists } = self.estimate(terms);
        // A catalogue that small is not sampled: every search on the index.
        if self.catalogue <= bounds.exact_up_to {
            return Route::Engine { matches };
        }
        if matches > bounds.exact_up_to {
            return Route::Broad { matches };
        }
        let costs = bounds.costs.unwrap_or(ReadCosts::of(backend));
        let engine = lists.iter().sum::<i64>();
        // The first of the rarest words.
        let rarest =
            lists.iter().enumerate().min_by_key(|(_, list)| **list).map(|(term, &list)| (term, list));
        if let Some((term, rarest)) = rarest
            && rarest <= bounds.anchor_up_to
            && rarest.saturating_mul(costs.product_by_id.saturating_add(1)) < engine
        {
            return Route::Anchored { term, matches };
        }
        if engine <= Self::engine_allowance(bounds, costs) {
            return Route::Engine { matches };
        }
        // Every word is common, their matches together are not: no list is
        // short enough to read, and the matches too sparse for a page of
        // them to be found in a few reads (`store::broad`).
        Route::Broad { matches }
    }

    /// Whether the engine may be given a search so estimated, whichever way
    /// [`Self::route`] would send it: its lists cost no more than a broad
    /// search may read, and it ranks no more matches than an exact search
    /// may. A relevance listing that began on the engine goes on there only
    /// while this holds, so that a page token cannot send a search to the
    /// engine that would read more.
    pub fn engine_may_answer(&self, estimate: &Estimate, bounds: &SearchBounds, backend: Backend) -> bool {
        let costs = bounds.costs.unwrap_or(ReadCosts::of(backend));
        self.catalogue <= bounds.exact_up_to
            || (estimate.matches <= bounds.exact_up_to
                && estimate.lists.iter().sum::<i64>() <= Self::engine_allowance(bounds, costs))
    }

    /// How many list entries the engine may read for one search: what
    /// reading a broad search's products in order costs.
    fn engine_allowance(bounds: &SearchBounds, costs: ReadCosts) -> i64 {
        (bounds.rows_read as i64).saturating_mul(costs.product_in_order)
    }

    /// Each term's BM25 weight, from how many sampled products have it.
    pub fn idfs(&self, terms: &Terms) -> Vec<f64> {
        terms.iter().map(|term| idf(self.having(term).len() as f64, f64::from(self.products))).collect()
    }

    pub fn is_stale(&self, bounds: &SearchBounds) -> bool {
        self.taken.elapsed() >= bounds.refresh
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::search::Words;

    fn sample(catalogue: i64) -> Sample {
        let texts: Vec<(String, String)> = (0..100)
            .map(|i| {
                let name = if i % 10 == 0 { "Cast iron teapot" } else { "Oak table" };
                (name.to_owned(), format!("with care, model M{i}"))
            })
            .collect();
        Sample::of(
            catalogue,
            texts.iter().map(|(n, d)| (n.as_str(), d.as_str())),
            Indexed::by(Backend::Sqlite),
        )
    }

    #[test]
    fn estimates_scale_the_sampled_share_to_the_catalogue() {
        let sample = sample(1_000_000);
        let estimate = |query: &str| sample.estimate(&Terms::of(&Words::of(query))).matches;
        assert_eq!(estimate("with"), 1_000_000);
        assert_eq!(estimate("teapot"), 100_000);
        assert_eq!(estimate("iron tea"), 100_000, "the last word as a prefix");
        assert_eq!(estimate("oak teapot"), 0, "every word");
        assert_eq!(estimate("m1"), 110_000, "M1 and M10..M19");
        assert_eq!(estimate("nothing"), 0);
        assert!((sample.average_words - 6.1).abs() < 1e-9, "{}", sample.average_words);
    }

    #[test]
    fn a_search_goes_the_way_that_reads_least() {
        // 100 sampled of a million: each sampled product stands for 10,000.
        let sample = sample(1_000_000);
        let bounds = |costs| SearchBounds {
            anchor_up_to: 10_000,
            costs: Some(costs),
            ..SearchBounds::for_index_matches(20_000)
        };
        // The engine may read 120,000 entries (40,000 products in order at
        // 3 each); an anchored search costs 16 entries per product.
        let innodb = bounds(ReadCosts { product_by_id: 15, product_in_order: 3 });
        let route = |query: &str| sample.route(&Terms::of(&Words::of(query)), &innodb, Backend::MySql);
        assert_eq!(route("m42"), Route::Engine { matches: 10_000 }, "one short list");
        assert_eq!(route("teapot"), Route::Broad { matches: 100_000 }, "many matches");
        assert_eq!(route("oak with"), Route::Broad { matches: 900_000 });
        assert_eq!(
            route("with m42"),
            Route::Anchored { term: 1, matches: 10_000 },
            "a common and a rare word"
        );
        assert_eq!(route("m42 with"), Route::Anchored { term: 0, matches: 10_000 }, "in either place");
        assert_eq!(
            route("with oak m42"),
            Route::Anchored { term: 2, matches: 10_000 },
            "the rarest of three"
        );
        assert_eq!(route("m42 m4"), Route::Engine { matches: 10_000 }, "120,000 entries, 160,000 anchored");
        assert_eq!(route("teapot m42"), Route::Engine { matches: 0 }, "110,000 entries, 160,000 anchored");
        assert_eq!(route("oak teapot"), Route::Broad { matches: 0 }, "1,000,000 entries, none rare");
        assert_eq!(route("teapot m1"), Route::Broad { matches: 10_000 }, "210,000 entries, none rare");

        // The engine may read 800,000 entries; 101 per anchored product.
        let fts5 = bounds(ReadCosts { product_by_id: 100, product_in_order: 20 });
        let route = |query: &str| sample.route(&Terms::of(&Words::of(query)), &fts5, Backend::Sqlite);
        assert_eq!(route("teapot m1"), Route::Engine { matches: 10_000 }, "210,000 entries");
        assert_eq!(
            route("with oak m42"),
            Route::Anchored { term: 2, matches: 10_000 },
            "1,910,000, 1,010,000"
        );
        assert_eq!(route("with m42"), Route::Broad { matches: 10_000 }, "1,010,000 either way");
        assert_eq!(route("oak teapot"), Route::Broad { matches: 0 }, "1,000,000 entries, none rare");

        // Without costs given, the backend's own.
        let measured = SearchBounds { anchor_up_to: 10_000, ..SearchBounds::for_index_matches(20_000) };
        for (backend, costs) in [(Backend::MySql, innodb), (Backend::Sqlite, fts5)] {
            for query in ["teapot m1", "with m42", "m42 m4", "oak teapot"] {
                let terms = Terms::of(&Words::of(query));
                assert_eq!(sample.route(&terms, &measured, backend), sample.route(&terms, &costs, backend));
            }
        }
        let small = super::Sample::of(20_000, [], Indexed::by(Backend::Sqlite));
        assert_eq!(
            small.route(&Terms::of(&Words::of("with")), &innodb, Backend::MySql),
            Route::Engine { matches: 0 },
            "not sampled"
        );

        // A relevance token of the engine goes on where the engine may read
        // the lists: wherever the route is the engine (else the token is
        // refused the moment it is made), and nowhere the engine would read
        // more than a broad search.
        for (bounds, backend) in [(&innodb, Backend::MySql), (&fts5, Backend::Sqlite)] {
            for query in
                ["m42", "teapot", "oak with", "with m42", "m42 m4", "teapot m42", "oak teapot", "teapot m1"]
            {
                let terms = Terms::of(&Words::of(query));
                let may = sample.engine_may_answer(&sample.estimate(&terms), bounds, backend);
                if let Route::Engine { .. } = sample.route(&terms, bounds, backend) {
                    assert!(may, "{query} on {backend:?}");
                }
                if matches!(query, "teapot" | "oak with" | "oak teapot") {
                    assert!(!may, "{query} on {backend:?}: a broad search's lists");
                }
            }
        }
        let may = |query: &str, bounds, backend| {
            sample.engine_may_answer(&sample.estimate(&Terms::of(&Words::of(query))), bounds, backend)
        };
        assert!(!may("with m42", &fts5, Backend::Sqlite), "1,010,000 entries");
        assert!(!may("with oak m42", &innodb, Backend::MySql), "anchored: 1,910,000 entries for the engine");
        assert!(
            small.engine_may_answer(&small.estimate(&Terms::of(&Words::of("with"))), &innodb, Backend::MySql),
            "not sampled"
        );
    }

    #[test]
    fn rarer_terms_weigh_more() {
        let sample = sample(1000);
        let idfs = sample.idfs(&Terms::of(&Words::of("with teapot m42")));
        assert!(idfs[0] < idfs[1] && idfs[1] < idfs[2], "{idfs:?}");
    }

    #[test]
    fn an_empty_catalogue_matches_nothing() {
        let sample = Sample::of(0, [], Indexed::by(Backend::MySql));
        assert_eq!(sample.estimate(&Terms::of(&Words::of("tea"))).matches, 0);
    }
}
