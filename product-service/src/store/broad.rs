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
//! - By relevance: the newest [`SearchBounds::ranked_matches`] matches,
//!   ranked by BM25 with term weights from the sample; this listing ends
//!   after them (ranking every match is what costs). The newest products
//!   are read and matched here, at most a quarter of the bound on rows
//!   read (so a word in 1% of products ranks about 50 matches).
//!
//! `total_size` is the sample's estimate.

use std::sync::{Arc, Mutex};

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family},
};

use super::*;
use crate::{
    search::{Indexed, bm25},
    search_sample::Sample,
};

/// How a relevance page token's score begins when the listing is a broad
/// search's: its next page is one too, whatever a newer sample says.
pub const BROAD_CURSOR: &str = "broad ";

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
}

impl SearchPath {
    pub const ALL: [SearchPath; 3] = [SearchPath::Index, SearchPath::Few, SearchPath::Broad];

    /// The metric label: `index`, `few` or `broad`.
    pub fn label(self) -> &'static str {
        match self {
            SearchPath::Index => "index",
            SearchPath::Few => "few",
            SearchPath::Broad => "broad",
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
    /// Searches answered so far, by path (`index`, `few` or `broad`): for
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
        words: &Words,
        sample: &Sample,
        estimate: i64,
    ) -> Result<Page, ApiError> {
        let share = (estimate as f64 / sample.catalogue.max(1) as f64).clamp(0.001, 1.0);
        let terms = Terms::of(words);
        let mut page = match q.order.field {
            SortField::Relevance => self.broad_ranked(q, &terms, sample, share).await?,
            _ => self.broad_ordered(q, &terms, share).await?,
        };
        page.total_size = estimate;
        page.broad = true;
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
                after = Some(Cursor::after(&last.clone().into_product()?, q.order));
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

    /// The score and id a broad relevance page goes on after.
    fn broad_after(q: &ListQuery<'_>) -> Result<Option<(f64, i64)>, ApiError> {
        let Some(after) = q.after else { return Ok(None) };
        let score = after
            .sort_value
            .strip_prefix(BROAD_CURSOR)
            .and_then(|score| score.parse::<f64>().ok())
            .filter(|score| score.is_finite())
            .ok_or_else(|| ApiError::invalid("page_token", "is not valid"))?;
        Ok(Some((score, after.id)))
    }

    /// The products of the newest matches of `terms`, newest first: the
    /// newest products read and matched here, at most a quarter of
    /// [`SearchBounds::rows_read`] of them. Not found by an engine: InnoDB
    /// finds every match of a query before it returns one, and FTS5 merges
    /// the whole lists of matches of every word that begins with the last
    /// word before the first (60 ms for `with*` in a million products,
    /// whatever the LIMIT or the range of rowids asked for).
    async fn newest_matches(
        &self,
        terms: &Terms,
        newest: usize,
        share: f64,
    ) -> Result<Vec<ProductRow>, ApiError> {
        let most_read = (self.searches.bounds.rows_read / 4).max(1);
        let indexed = Indexed::by(self.db.backend());
        let by_id_desc = OrderBy { field: SortField::Id, descending: true };
        let (mut matches, mut from, mut read) = (Vec::new(), None, 0);
        while matches.len() < newest && read < most_read {
            let wanted = newest - matches.len();
            let expected = (wanted as f64 / share * 1.2) as usize;
            let chunk = expected.clamp(1, MOST_PER_READ).min(most_read - read);
            let (batch, ended) = self.read_on(by_id_desc, from.as_ref(), chunk).await?;
            read += batch.len();
            from = batch.last().map(|row| Cursor { sort_value: String::new(), id: row.id });
            matches.extend(
                batch.into_iter().filter(|row| terms.hits(indexed, &row.name, &row.description).is_some()),
            );
            if ended {
                break;
            }
        }
        matches.truncate(newest);
        Ok(matches)
    }

    /// A broad search by relevance: the newest matches, ranked by BM25
    /// with term weights from the sample.
    async fn broad_ranked(
        &self,
        q: &ListQuery<'_>,
        terms: &Terms,
        sample: &Sample,
        share: f64,
    ) -> Result<Page, ApiError> {
        let newest = self.searches.bounds.ranked_matches;
        let after = Self::broad_after(q)?;
        let matches = self.newest_matches(terms, newest, share).await?;
        let indexed = Indexed::by(self.db.backend());
        let idfs = sample.idfs(terms);
        let mut ranked: Vec<(f64, ProductRow)> = matches
            .into_iter()
            .filter_map(|row| {
                let (hits, words) = terms.hits(indexed, &row.name, &row.description)?;
                Some((bm25(&hits, &idfs, words, sample.average_words), row))
            })
            .collect();
        ranked.sort_by(|(a, row_a), (b, row_b)| b.total_cmp(a).then(row_a.id.cmp(&row_b.id)));
        let (scores, rows) = ranked
            .into_iter()
            .filter(|(score, row)| {
                after.is_none_or(|(last, last_id)| *score < last || (*score == last && row.id > last_id))
            })
            .take(q.limit.max(0) as usize)
            .unzip();
        Ok(Page { rows, scores, ..Page::default() })
    }
}
