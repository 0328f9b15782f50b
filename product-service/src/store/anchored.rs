//! Searches of a rare word among common ones (`with m20x`, `blue lamp
//! K200`): the engine finds the products of the rare word alone, and Rust
//! keeps those that have every word.
//!
//! Both engines read the whole list of every word of a query to intersect
//! them (InnoDB its document lists, FTS5 every posting of the last word's
//! prefix first), so a query's cost is the sum of its words' lists, not its
//! matches: `with` beside a model name read every product of `with`, most
//! of the catalogue (BENCHMARKS.md, "Routing searches by what they read").
//! Asked for the rarest word alone, the engine reads only its list; each of those products is read from the table and its words are
//! matched here ([`Terms::hits`], the engines' semantics). The answer is
//! exact: every match, `total_size` the count of them all.
//!
//! At most twice [`SearchBounds::anchor_up_to`] products are read per call
//! (the sample's estimate of the rarest word may be low): a word with more
//! is not rare, and the search is broad instead.
//!
//! - In a column's order the engine's statement is the listing's own
//!   keyset read (the word's products after the token, in that order),
//!   filtered; a later page counts the matches in a second read.
//! - By relevance every match is ranked with BM25 (term weights from the
//!   sample, as broad searches rank), and the page is a keyset on (score,
//!   id) in that ranking. Its token says so ([`Ranked::Anchored`]), so
//!   that the next page is ranked the same way.

use super::{broad::ranked, *};
use crate::search::{Indexed, comes_after};

/// An anchored page, or why there is none.
pub(super) enum Anchored {
    Page(Page),
    /// The word has more products than an anchored search reads.
    NotRare,
}

impl ProductStore {
    /// A page of the search for `words` anchored on word `term` (see the
    /// module's comment).
    pub(super) async fn anchored_search(
        &self,
        q: &ListQuery<'_>,
        words: &Words,
        terms: &Terms,
        term: usize,
        sample: &Sample,
    ) -> Result<Anchored, ApiError> {
        let anchor = words.only(term);
        let indexed = Indexed::by(self.db.backend());
        let matching = |rows: Vec<ProductRow>| -> Vec<ProductRow> {
            rows.into_iter()
                .filter(|row| terms.hits(indexed, &row.name, &row.description).is_some())
                .collect()
        };
        let by_id = OrderBy { field: SortField::Id, descending: false };
        if q.order.field == SortField::Relevance {
            let Some(rows) = self.anchor_rows(&anchor, by_id, None).await? else {
                return Ok(Anchored::NotRare);
            };
            let matches = matching(rows);
            return Ok(Anchored::Page(Self::anchored_ranked(q, terms, term, matches, sample, indexed)?));
        }
        let Some(rows) = self.anchor_rows(&anchor, q.order, q.after).await? else {
            return Ok(Anchored::NotRare);
        };
        let mut rows = matching(rows);
        let total_size = if q.after.is_none() {
            rows.len() as i64
        } else {
            match self.anchor_rows(&anchor, by_id, None).await? {
                Some(all) => matching(all).len() as i64,
                None => return Ok(Anchored::NotRare),
            }
        };
        rows.truncate(q.limit.max(0) as usize);
        Ok(Anchored::Page(Page { rows, total_size, path: Some(SearchPath::Anchored), ..Page::default() }))
    }

    /// The products the engine finds for `anchor` in `order` after `after`
    /// (the listing's keyset), or `None` when there are more than an
    /// anchored search reads.
    async fn anchor_rows(
        &self,
        anchor: &Words,
        order: OrderBy,
        after: Option<&Cursor>,
    ) -> Result<Option<Vec<ProductRow>>, ApiError> {
        let most = 2 * self.searches.bounds.anchor_up_to;
        let read = ListQuery { order, query: None, after, limit: most + 1 };
        let (sql, params) = self.search_statement(&read, anchor)?;
        let rows: Vec<ListedRow> =
            on_db!(&self.db, pool => bind_all!(sqlx::query_as(&sql), &params).fetch_all(pool).await)?;
        if rows.len() as i64 > most {
            return Ok(None);
        }
        Ok(Some(rows.into_iter().map(|row| row.product).collect()))
    }

    /// The relevance page of these matches (all of the search's).
    fn anchored_ranked(
        q: &ListQuery<'_>,
        terms: &Terms,
        term: usize,
        matches: Vec<ProductRow>,
        sample: &Sample,
        indexed: Indexed,
    ) -> Result<Page, ApiError> {
        let after = match q.after {
            None => None,
            Some(&Cursor::Ranked(Ranked::Anchored { score, id, .. })) => Some((score, id)),
            Some(_) => return Err(listing::invalid_token()),
        };
        let total_size = matches.len() as i64;
        let idfs = sample.idfs(terms);
        let (mut rows, mut scores, mut cursors) = (Vec::new(), Vec::new(), Vec::new());
        for (score, row) in ranked(matches, terms, &idfs, sample, indexed)
            .into_iter()
            .filter(|(score, row)| comes_after(*score, row.id, after))
            .take(q.limit.max(0) as usize)
        {
            cursors.push(Cursor::Ranked(Ranked::Anchored { term, score, id: row.id }));
            rows.push(row);
            scores.push(score);
        }
        Ok(Page { rows, scores, cursors, total_size, path: Some(SearchPath::Anchored), resume: None })
    }
}
