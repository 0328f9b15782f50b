//! Searches of common words: matched in Rust over a bounded read instead of
//! by the full-text engine.
//!
//! An engine's cost is its matches: InnoDB computes and ranks every match
//! of `MATCH … AGAINST` whatever the LIMIT (12–15 s for `with`, in most of
//! a million products), and FTS5's bm25() counts every match too. A
//! search that the catalogue's sample ([`Sample`]) says matches more than
//! [`SearchBounds::exact_up_to`] products is broad: its matches are so
//! dense that a page of them is found by reading the catalogue as an
//! unfiltered listing would, on the order's own index, and keeping the
//! products whose words match ([`Terms::hits`], the engines' semantics).
//! No call reads more than [`SearchBounds::rows_read`] products:
//!
//! - Ordered by a column: the listing in that order from the page token
//!   on, until the page is full. Exactly the page the engine would give. If
//!   the bound is reached first (the sample was wrong, or the matches
//!   cluster elsewhere in that order) the page is shorter than asked, even
//!   empty, with a token that goes on from the last product read (AIP-158
//!   allows short pages).
//! - By relevance: the newest products in windows, each window's matches
//!   ranked by BM25 with term weights from the sample, window after window
//!   (see [`Ranked::Broad`]): ranking every match is what costs. A window
//!   holds [`SearchBounds::ranked_matches`] matches or a quarter of the
//!   bound on rows read, so a word in 1% of products ranks about 50
//!   matches at a time. A page stopped by the bound is short, with a token.
//!
//! A search is broad too when every word is common but their matches
//! together are few (`oak sto` on MariaDB: words in 9% and 1.3% of
//! products, 0.1% together): the engine would read both words' whole lists
//! (a cost that grows with the catalogue; BENCHMARKS.md, "Routing searches
//! by what they read"), more than this read's bound costs, and no word's list is short enough to
//! anchor on (`store::anchored`; [`Sample::route`] weighs them). Its pages
//! are as above, short ones more often: the bound on rows read holds
//! whatever the matches' density.
//!
//! `total_size` is the sample's estimate.

use std::sync::{Arc, Mutex};

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family},
};

use super::*;
use crate::{
    page_token::Window,
    search::{Indexed, bm25, comes_after},
    search_sample::Sample,
};

// By relevance the newest products are read as windows, one after the
// other: a window holds the newest products not in the windows before it,
// until [`SearchBounds::ranked_matches`] matches or a quarter of
// [`SearchBounds::rows_read`] products. Each window's matches are ranked
// with BM25 and listed in that order before the next window's: ranking
// every match is what costs, so relevance ranks within recency. A page
// token names its window by ids ([`Ranked::Broad`]), so a page reads it
// again (at most that quarter), and the listing gives every match once.

/// A window as read.
struct WindowRead {
    below: i64,
    down_to: i64,
    /// Its products that match, newest first.
    matches: Vec<ProductRow>,
    /// Products read.
    read: usize,
}

/// The products of `matches` that have every term, best first by BM25 with
/// the sample's term weights `idfs`, ties by id: how searches matched in
/// Rust rank (`store::anchored` too).
pub(super) fn ranked(
    matches: Vec<ProductRow>,
    terms: &Terms,
    idfs: &[f64],
    sample: &Sample,
    indexed: Indexed,
) -> Vec<(f64, ProductRow)> {
    let mut ranked: Vec<(f64, ProductRow)> = matches
        .into_iter()
        .filter_map(|row| {
            let (hits, words) = terms.hits(indexed, &row.name, &row.description)?;
            Some((bm25(&hits, idfs, words, sample.average_words), row))
        })
        .collect();
    ranked.sort_by(|(a, row_a), (b, row_b)| b.total_cmp(a).then(row_a.id.cmp(&row_b.id)));
    ranked
}

/// Most products one statement of a broad search reads.
const MOST_PER_READ: usize = 2_000;

/// Spread of the sample over the catalogue: it is read as this many runs of
/// consecutive ids, evenly spaced between the first id and the last.
const SAMPLE_RUNS: usize = 10;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SearchLabels {
    /// [`SearchPath::label`].
    pub path: &'static str,
}

/// How a search was answered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SearchPath {
    /// By the full-text engine: the page, and the count apart.
    Index,
    /// By the full-text engine, every match's id in one statement (a
    /// search by relevance with few matches).
    Few,
    /// Matched in Rust over a bounded read (common words).
    Broad,
    /// The engine finds the products of the rarest word, Rust keeps those
    /// with every word (a rare word among common ones).
    Anchored,
}

impl SearchPath {
    pub const ALL: [SearchPath; 4] =
        [SearchPath::Index, SearchPath::Few, SearchPath::Broad, SearchPath::Anchored];

    /// The metric label: `index`, `few`, `broad` or `anchored`.
    pub fn label(self) -> &'static str {
        match self {
            SearchPath::Index => "index",
            SearchPath::Few => "few",
            SearchPath::Broad => "broad",
            SearchPath::Anchored => "anchored",
        }
    }
}

/// Searches answered so far, by how (metric
/// `storegate_product_searches_total`).
pub type SearchCounts = Family<SearchLabels, Counter>;

/// What a store's searches share: the bounds, the latest sample of the
/// catalogue's words, and counts.
#[derive(Debug)]
pub(super) struct Searches {
    pub(super) bounds: SearchBounds,
    sample: Mutex<Option<Arc<Sample>>>,
    /// Held by the one search that takes a new sample.
    sampling: tokio::sync::Mutex<()>,
    counts: SearchCounts,
}

impl Default for Searches {
    fn default() -> Searches {
        Searches::new(SearchBounds::default())
    }
}

impl Searches {
    pub(super) fn new(bounds: SearchBounds) -> Searches {
        // Every path's series from the start, at 0: Prometheus's rate() and
        // increase() see the first search of a path, not only the second.
        let counts = SearchCounts::default();
        for path in SearchPath::ALL {
            drop(counts.get_or_create(&SearchLabels { path: path.label() }));
        }
        Searches { bounds, sample: Mutex::default(), sampling: tokio::sync::Mutex::default(), counts }
    }

    pub(super) fn count(&self, path: SearchPath) {
        self.counts.get_or_create(&SearchLabels { path: path.label() }).inc();
    }

    fn latest(&self) -> Option<Arc<Sample>> {
        self.sample.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn keep(&self, sample: Sample) -> Arc<Sample> {
        let sample = Arc::new(sample);
        *self.sample.lock().unwrap_or_else(|e| e.into_inner()) = Some(sample.clone());
        sample
    }
}

impl ProductStore {
    /// Searches answered so far, by path (`index`, `few`, `broad` or
    /// `anchored`): for
    /// the metrics endpoint and tests.
    pub fn search_counts(&self) -> SearchCounts {
        self.searches.counts.clone()
    }

    /// Forgets the sample of the catalogue's words: the next search takes a
    /// new one (after a bulk import, which may change it wholly).
    pub(super) fn forget_search_sample(&self) {
        *self.searches.sample.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    /// The sample of the catalogue's words. The first search takes it; when
    /// it is stale, one search takes a new one while the others go on with
    /// the old.
    pub(super) async fn search_sample(&self) -> Result<Arc<Sample>, ApiError> {
        match self.searches.latest() {
            Some(sample) if !sample.is_stale(&self.searches.bounds) => Ok(sample),
            Some(sample) => {
                let Ok(_sampling) = self.searches.sampling.try_lock() else { return Ok(sample) };
                match self.take_sample().await {
                    Ok(new) => Ok(self.searches.keep(new)),
                    Err(error) => {
                        tracing::warn!(%error, "could not sample the catalogue's words; searching on with the older sample");
                        Ok(sample)
                    }
                }
            }
            None => {
                let _sampling = self.searches.sampling.lock().await;
                match self.searches.latest() {
                    Some(sample) => Ok(sample),
                    None => Ok(self.searches.keep(self.take_sample().await?)),
                }
            }
        }
    }

    /// Reads a sample of the catalogue's words: [`SAMPLE_RUNS`] runs of
    /// consecutive products spread over the ids, a primary-key range each.
    /// A catalogue of at most [`SearchBounds::exact_up_to`] products needs
    /// none (every search of it is on the index): only its size is read.
    async fn take_sample(&self) -> Result<Sample, ApiError> {
        let bounds = self.searches.bounds;
        let catalogue = self.count(None).await?;
        let mut texts: Vec<(i64, String, String)> = Vec::new();
        if catalogue > bounds.exact_up_to {
            let (first, last): (Option<i64>, Option<i64>) = on_db!(&self.db, pool => {
                sqlx::query_as("SELECT MIN(id), MAX(id) FROM products").fetch_one(pool).await
            })?;
            if let (Some(first), Some(last)) = (first, last) {
                let span = last - first + 1;
                let runs = if span <= bounds.sample_size as i64 { 1 } else { SAMPLE_RUNS };
                let per_run = bounds.sample_size.div_ceil(runs) as i64;
                for run in 0..runs as i64 {
                    let from = first + span * run / runs as i64;
                    let rows: Vec<(i64, String, String)> = on_db!(&self.db, pool => {
                        sqlx::query_as("SELECT id, name, description FROM products WHERE id >= ? ORDER BY id LIMIT ?")
                            .bind(from)
                            .bind(per_run)
                            .fetch_all(pool)
                            .await
                    })?;
                    texts.extend(rows);
                }
            }
        }
        // Runs overlap where ids are sparse.
        texts.sort_unstable_by_key(|(id, ..)| *id);
        texts.dedup_by_key(|(id, ..)| *id);
        let indexed = Indexed::by(self.db.backend());
        Ok(Sample::of(
            catalogue,
            texts.iter().map(|(_, name, description)| (name.as_str(), description.as_str())),
            indexed,
        ))
    }

    /// A page of the broad search for `words` (see the module's comment),
    /// whose matches `sample` estimates at `estimate`.
    pub(super) async fn broad_search(
        &self,
        q: &ListQuery<'_>,
        terms: &Terms,
        sample: &Sample,
        estimate: i64,
    ) -> Result<Page, ApiError> {
        let share = (estimate as f64 / sample.catalogue.max(1) as f64).clamp(0.001, 1.0);
        let mut page = match q.order.field {
            SortField::Relevance => self.broad_ranked(q, terms, sample, share).await?,
            _ => self.broad_ordered(q, terms, share).await?,
        };
        // An estimate, but never fewer than this page shows (a sample can
        // miss a rare combination of common words entirely).
        page.total_size = estimate.max(page.rows.len() as i64);
        page.path = Some(SearchPath::Broad);
        Ok(page)
    }

    /// Products read in `order` after `after`, at most `limit`; and whether
    /// the catalogue ended.
    async fn read_on(
        &self,
        order: OrderBy,
        after: Option<&Cursor>,
        limit: usize,
    ) -> Result<(Vec<ProductRow>, bool), ApiError> {
        let listing = ListQuery { order, query: None, after, limit: limit as i64 };
        let rows = self.listed_rows(&listing).await?;
        let ended = rows.len() < limit;
        Ok((rows.into_iter().map(|row| row.product).collect(), ended))
    }

    /// A broad search in a column's order: the listing, filtered.
    async fn broad_ordered(&self, q: &ListQuery<'_>, terms: &Terms, share: f64) -> Result<Page, ApiError> {
        let bounds = self.searches.bounds;
        let indexed = Indexed::by(self.db.backend());
        let limit = q.limit.max(1) as usize;
        let mut after = q.after.cloned();
        let (mut rows, mut read) = (Vec::new(), 0);
        loop {
            let wanted = limit - rows.len();
            // Enough to fill the page if the estimate holds, and half again.
            let expected = (wanted as f64 / share * 1.5) as usize;
            let chunk = expected.max(wanted).min(MOST_PER_READ.max(wanted)).min(bounds.rows_read - read);
            let (batch, ended) = self.read_on(q.order, after.as_ref(), chunk).await?;
            read += batch.len();
            if let Some(last) = batch.last() {
                after = Some(Cursor::after(&last.clone().into_product()?, q.order)?);
            }
            rows.extend(
                batch
                    .into_iter()
                    .filter(|row| terms.hits(indexed, &row.name, &row.description).is_some())
                    .take(wanted),
            );
            if rows.len() == limit || ended {
                return Ok(Page { rows, ..Page::default() });
            }
            if read >= bounds.rows_read {
                return Ok(Page { rows, resume: after, ..Page::default() });
            }
        }
    }

    /// A broad search by relevance: the matches of one window of the
    /// newest products at a time, ranked by BM25 with term weights from the
    /// sample (see [`Window`]).
    async fn broad_ranked(
        &self,
        q: &ListQuery<'_>,
        terms: &Terms,
        sample: &Sample,
        share: f64,
    ) -> Result<Page, ApiError> {
        let bounds = self.searches.bounds;
        let window_read = (bounds.rows_read / 4).max(1);
        let indexed = Indexed::by(self.db.backend());
        let idfs = sample.idfs(terms);
        let limit = q.limit.max(0) as usize;
        let (mut window, mut after) = match q.after {
            None => (Window { below: None, down_to: None }, None),
            Some(&Cursor::Ranked(Ranked::Broad { window, after })) => (window, after),
            Some(_) => return Err(listing::invalid_token()),
        };
        let (mut page, mut read) = (Page::default(), 0);
        loop {
            let WindowRead { below, down_to, matches, read: window_cost } =
                self.read_window(window, terms, share).await?;
            read += window_cost;
            let wanted = limit - page.rows.len();
            for (score, row) in ranked(matches, terms, &idfs, sample, indexed)
                .into_iter()
                .filter(|(score, row)| comes_after(*score, row.id, after))
                .take(wanted)
            {
                let window = Window { below: Some(below), down_to: Some(down_to) };
                page.cursors.push(Cursor::Ranked(Ranked::Broad { window, after: Some((score, row.id)) }));
                page.rows.push(row);
                page.scores.push(score);
            }
            // A window down to 0 reached the catalogue's first product.
            if page.rows.len() == limit || down_to == 0 {
                return Ok(page);
            }
            window = Window { below: Some(down_to), down_to: None };
            after = None;
            if read + window_read > bounds.rows_read {
                page.resume = Some(Cursor::Ranked(Ranked::Broad { window, after: None }));
                return Ok(page);
            }
        }
    }

    /// The products of `window` that match `terms`, newest first, and the
    /// window's bounds: a window met for the first time ends after
    /// [`SearchBounds::ranked_matches`] matches or a quarter of
    /// [`SearchBounds::rows_read`] products; one from a page token is read
    /// again between its bounds.
    async fn read_window(&self, window: Window, terms: &Terms, share: f64) -> Result<WindowRead, ApiError> {
        let bounds = self.searches.bounds;
        // A window read again may have gained products since: on MySQL an
        // id is taken at the insert and committed at any time after, so a
        // product with an id inside the window can appear once it was read.
        // Twice its first bound reads those too, and still bounds a page
        // token made up with ids far apart.
        let first_read = (bounds.rows_read / 4).max(1);
        let most_read = if window.down_to.is_some() { 2 * first_read } else { first_read };
        let indexed = Indexed::by(self.db.backend());
        let by_id_desc = OrderBy { field: SortField::Id, descending: true };
        let mut from = window.below.map(Cursor::Id);
        let (mut matches, mut read, mut newest, mut oldest) = (Vec::new(), 0, None, None);
        let ended = loop {
            let chunk = match (window.down_to, window.below) {
                // Its products, no more: never more than its ids (ids are
                // never reused; deletes only thin it).
                (Some(down_to), Some(below)) => {
                    let ids = usize::try_from(below - down_to).unwrap_or(0);
                    MOST_PER_READ.min(most_read - read).min(ids.max(1))
                }
                (Some(_), None) => MOST_PER_READ.min(most_read - read),
                (None, _) => {
                    let wanted = bounds.ranked_matches - matches.len();
                    let expected = (wanted as f64 / share * 1.2) as usize;
                    expected.clamp(1, MOST_PER_READ).min(most_read - read)
                }
            };
            let (mut batch, mut ended) = self.read_on(by_id_desc, from.as_ref(), chunk).await?;
            if let Some(down_to) = window.down_to {
                let inside = batch.iter().take_while(|row| row.id >= down_to).count();
                ended |= inside < batch.len();
                batch.truncate(inside);
            }
            read += batch.len();
            newest = newest.or(batch.first().map(|row| row.id));
            oldest = batch.last().map(|row| row.id).or(oldest);
            from = batch.last().map(|row| Cursor::Id(row.id)).or(from);
            matches.extend(
                batch.into_iter().filter(|row| terms.hits(indexed, &row.name, &row.description).is_some()),
            );
            let full = window.down_to.is_none() && matches.len() >= bounds.ranked_matches;
            if ended || full || read >= most_read {
                break ended;
            }
        };
        // A new window's upper bound is pinned on its newest product, so
        // that products created since are not in it when it is read again.
        let below = window.below.or(newest.map(|id| id + 1)).unwrap_or(0);
        let down_to = match window.down_to {
            Some(down_to) => down_to,
            None if ended => 0,
            None => oldest.unwrap_or(0),
        };
        Ok(WindowRead { below, down_to, matches, read })
    }
}
