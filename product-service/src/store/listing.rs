//! The product store's listings: keyset pages in every order, searches on
//! the full-text index and the routing to the other ways
//! (`store::anchored`, `store::broad`), counts, and the plans behind them.

use super::*;

/// MySQL's relevance of a row, and its filter: `?` is `Words::mysql`. The
/// columns are those of the FULLTEXT index (migrations/mysql/0006).
const MYSQL_MATCH: &str = "MATCH (products.name, products.description) AGAINST (? IN BOOLEAN MODE)";

/// A search by relevance with at most this many matches finds them all in
/// one statement ([`ProductStore::search_few`]).
const FEW_MATCHES: i64 = 1000;

/// A page token whose cursor is none of its listing's ways of answering
/// (tokens are decoded per order; a search's way is checked here).
pub(super) fn invalid_token() -> ApiError {
    ApiError::invalid("page_token", "is not valid")
}

/// A relevance page token whose listing cannot go on as it was ranked.
fn expired_token() -> ApiError {
    ApiError::invalid(
        "page_token",
        "has expired: the catalogue changed too much since the listing began; start again without it",
    )
}

impl ProductStore {
    /// One page of products in `q.order`, ties broken by id, continuing
    /// after `q.after` (keyset pagination: stable under concurrent inserts).
    /// With a query, a search on the full-text index (see [`Self::search`]).
    pub async fn list(&self, q: &ListQuery<'_>) -> Result<Page, ApiError> {
        if let Some(query) = q.query {
            return self.search(q, &Words::of(query)).await;
        }
        let rows = self.listed_rows(q).await?;
        self.page_of(rows).await
    }

    /// The rows of the unfiltered listing `q`, read on the hot reads' path.
    pub(super) async fn listed_rows(&self, q: &ListQuery<'_>) -> Result<Vec<ListedRow>, ApiError> {
        let (sql, params) = self.listing_statement(q)?;
        let rows = match &self.reads {
            Some(Reads::Sqlite(reads)) => Self::list_inline(reads, &sql, &params),
            Some(Reads::MySql(reads)) => {
                let page = Arc::new(PageRead { sql, params });
                return Ok(reads.pages.read(&*reads.connections, page, read_page).await?);
            }
            None => None,
        };
        Ok(match rows {
            Some(rows) => rows,
            None => on_db!(&self.db, pool => bind_all!(sqlx::query_as(&sql), &params).fetch_all(pool).await)?,
        })
    }

    /// The statement of an unfiltered listing, and its parameters.
    fn listing_statement(&self, q: &ListQuery<'_>) -> Result<(String, Vec<ListParam>), ApiError> {
        // MySQL/MariaDB is told the order's index: until InnoDB recounts its
        // statistics (in the background, after a tenth of the table
        // changed, or on ANALYZE TABLE) a freshly loaded table's indexes
        // claim 2 distinct values, and MariaDB then sorts the whole table
        // for a page (seen on 20,000 imported products: a scan and a
        // filesort of every row). SQLite's planner needs no statistics to
        // read an ORDER BY … LIMIT from its index (tests/plans.rs).
        let hint = match self.db.backend() {
            Backend::MySql => format!(" FORCE INDEX ({})", crate::plan::index_for(q.order.field)),
            Backend::Sqlite => String::new(),
        };
        // The total rides along in the same statement: one round trip, and
        // the same snapshot as the page.
        let mut sql = format!(
            "SELECT {COLUMNS}, (SELECT CAST(SUM(products) AS SIGNED) FROM product_counts) AS total_size \
             FROM products{hint} WHERE 1 = 1"
        );
        let mut params = Vec::new();
        self.keyset(q, &mut sql, &mut params)?;
        params.push(ListParam::Int(q.limit));
        Ok((sql, params))
    }

    /// The page of these unfiltered rows, with the total they carry or else
    /// one counted now.
    async fn page_of(&self, rows: Vec<ListedRow>) -> Result<Page, ApiError> {
        let total_size = match rows.first().and_then(|row| row.total_size) {
            Some(total) => total,
            None => self.count(None).await?,
        };
        Ok(Page { rows: rows.into_iter().map(|row| row.product).collect(), total_size, ..Page::default() })
    }

    /// Appends to a listing's `sql` the condition that continues after
    /// `q.after` in `q.order` (a column's order, not relevance), then the
    /// ORDER BY and LIMIT, and their parameters (but the limit's) to `params`.
    fn keyset(
        &self,
        q: &ListQuery<'_>,
        sql: &mut String,
        params: &mut Vec<ListParam>,
    ) -> Result<(), ApiError> {
        let (column, cmp, dir) = {
            // Qualified: in ORDER BY a bare `price` would name the CAST alias
            // of the select list (text), not the column.
            let column = match q.order.field {
                SortField::Id => "products.id",
                SortField::Name => "products.name",
                SortField::Price => "products.price",
                SortField::CreateTime => "products.create_time",
                SortField::Relevance => return Err(ApiError::invalid("order_by", "relevance needs a query")),
            };
            if q.order.descending { (column, "<", "DESC") } else { (column, ">", "ASC") }
        };
        // The cursor's id, and its value in the sort column (none by id).
        let after = match (q.after, q.order.field) {
            (None, _) => None,
            (Some(&Cursor::Id(id)), SortField::Id) => Some((id, None)),
            (Some(Cursor::Name { name, id }), SortField::Name) => {
                Some((*id, Some(ListParam::Text(name.clone()))))
            }
            (Some(&Cursor::Price { price, id }), SortField::Price) => {
                Some((id, Some(ListParam::Text(self.price_param(price)))))
            }
            (Some(&Cursor::CreateTime { time, id }), SortField::CreateTime) => {
                Some((id, Some(ListParam::Time(time))))
            }
            (Some(_), _) => return Err(invalid_token()),
        };
        match after {
            Some((after_id, None)) => {
                sql.push_str(&format!(" AND products.id {cmp} ?"));
                params.push(ListParam::Int(after_id));
            }
            Some((after_id, Some(sort_param))) => {
                // MySQL compares a DECIMAL with a string as doubles; cast the
                // bound price so the comparison stays exact. SQLite compares
                // its fixed-width text as text.
                let value = match (q.order.field, self.db.backend()) {
                    (SortField::Price, Backend::MySql) => "CAST(? AS DECIMAL(12,2))",
                    _ => "?",
                };
                // The leading bound makes the page a range of the column's
                // index; without it SQLite walks the index from its start
                // and filters, so deep pages cost more and more.
                sql.push_str(&format!(
                    " AND {column} {cmp}= {value} \
                     AND ({column} {cmp} {value} OR ({column} = {value} AND products.id {cmp} ?))"
                ));
                params.extend([sort_param.clone(), sort_param.clone(), sort_param, ListParam::Int(after_id)]);
            }
            None => {}
        }
        if q.order.field == SortField::Id {
            sql.push_str(&format!(" ORDER BY products.id {dir} LIMIT ?"));
        } else {
            sql.push_str(&format!(" ORDER BY {column} {dir}, products.id {dir} LIMIT ?"));
        }
        Ok(())
    }

    /// A page of the products whose name or description has every one of
    /// `words` (the last as a prefix), read from the full-text index: the
    /// matches are found in the index, so the cost grows with the matches,
    /// not with the catalogue. Ordered by relevance (best first, ties by
    /// id) or by a column as any listing.
    ///
    /// Relevance pages are a keyset on (score, id): the score of the last
    /// row travels in the page token and the next page starts strictly
    /// after it. Scores depend on the whole index (word frequencies), so a
    /// write between two pages may move rows across the boundary; an offset
    /// would shift every later row on any insert or delete before it, and
    /// a snapshot of the matches would need server state. The keyset never
    /// repeats a row while the index stands still, and a write only
    /// reorders the rows whose scores it changed.
    ///
    /// Only a search whose words' lists the engine can read within its
    /// allowance is given to the engine on all its words; the catalogue's
    /// sample says which ([`Sample::route`]). A rare word among common ones
    /// is looked up alone ([`Self::anchored_search`]); other searches are
    /// matched in Rust over a bounded read ([`Self::broad_search`]).
    async fn search(&self, q: &ListQuery<'_>, words: &Words) -> Result<Page, ApiError> {
        if words.is_empty() {
            return Ok(Page::default());
        }
        let sample = self.search_sample().await?;
        let terms = Terms::of(words);
        let route = match q.after {
            // A relevance listing goes on as it began: each way ranks its own.
            Some(Cursor::Ranked(ranked)) => {
                let estimate = sample.estimate(&terms);
                let matches = estimate.matches;
                match ranked {
                    // On the engine while it may still read the words'
                    // lists, and on the word it began with while the
                    // sample still says that word is rare: a token cannot
                    // make the engine read more than a search may.
                    Ranked::Engine { .. } => {
                        if !sample.engine_may_answer(&estimate, &self.searches.bounds, self.db.backend()) {
                            return Err(expired_token());
                        }
                        Route::Engine { matches }
                    }
                    Ranked::Anchored { term, .. } => {
                        let rare = estimate
                            .lists
                            .get(*term)
                            .is_some_and(|list| *list <= self.searches.bounds.anchor_up_to);
                        if !rare {
                            return Err(expired_token());
                        }
                        Route::Anchored { term: *term, matches }
                    }
                    Ranked::Broad { .. } => Route::Broad { matches },
                }
            }
            _ => sample.route(&terms, &self.searches.bounds, self.db.backend()),
        };
        if let Route::Anchored { term, .. } = route {
            match self.anchored_search(q, words, &terms, term, &sample).await? {
                Anchored::Page(page) => {
                    self.searches.count(SearchPath::Anchored);
                    return Ok(page);
                }
                // Its page token must not change how it is ranked.
                Anchored::NotRare if q.after.is_some() && q.order.field == SortField::Relevance => {
                    return Err(expired_token());
                }
                // The sample's estimate of the word was low: read broad.
                Anchored::NotRare => {}
            }
        }
        let estimate = route.matches();
        if !matches!(route, Route::Engine { .. }) {
            self.searches.count(SearchPath::Broad);
            return self.broad_search(q, &terms, &sample, estimate).await;
        }
        // Few matches, by relevance: one full-text statement gives every
        // match's id and score, so its count too, and only the page's rows
        // are read from the table (the page and the count otherwise cost
        // the engine two searches).
        let few = sample.catalogue <= FEW_MATCHES || (sample.sampled() > 0 && estimate <= FEW_MATCHES / 4);
        if q.order.field == SortField::Relevance
            && few
            && let Some(page) = self.search_few(q, words).await?
        {
            self.searches.count(SearchPath::Few);
            return Ok(page);
        }
        self.searches.count(SearchPath::Index);
        let (sql, params) = self.search_statement(q, words)?;
        let rows: Vec<ListedRow> =
            on_db!(&self.db, pool => bind_all!(sqlx::query_as(&sql), &params).fetch_all(pool).await)?;
        // A first page the matches do not fill holds them all: that is the
        // count, and the engine need not find them a second time (most
        // searches of rare words end so).
        let total_size = match q.after {
            None if (rows.len() as i64) < q.limit => rows.len() as i64,
            _ => self.count_matches(words).await?,
        };
        let scores = if q.order.field == SortField::Relevance {
            rows.iter().map(|row| row.score.unwrap_or_default()).collect()
        } else {
            Vec::new()
        };
        Ok(Page {
            rows: rows.into_iter().map(|row| row.product).collect(),
            scores,
            total_size,
            path: Some(SearchPath::Index),
            ..Page::default()
        })
    }

    /// A relevance page of a search with at most [`FEW_MATCHES`] matches:
    /// every match's id and score from the engine in one statement, in the
    /// order the engine pages them (score, then id), then the page's rows
    /// by id. None when there are more matches than that (the sample was
    /// wrong): the caller searches the usual way.
    async fn search_few(&self, q: &ListQuery<'_>, words: &Words) -> Result<Option<Page>, ApiError> {
        let mysql = self.db.backend() == Backend::MySql;
        let (sql, engine_query) = if mysql {
            (
                format!(
                    "SELECT products.id, {MYSQL_MATCH} AS score FROM products WHERE {MYSQL_MATCH} \
                     ORDER BY score DESC, products.id ASC LIMIT ?"
                ),
                words.mysql(),
            )
        } else {
            (
                "SELECT rowid, -bm25(products_search) AS score FROM products_search \
                 WHERE products_search MATCH ? ORDER BY score DESC, rowid ASC LIMIT ?"
                    .to_owned(),
                words.fts5(),
            )
        };
        let after = Self::relevance_after(q)?;
        let on_page = |&(id, score): &(i64, f64)| crate::search::comes_after(score, id, after);
        // Both statements on one connection: on MySQL sqlx's pool pings a
        // connection each time it is given back.
        /// Every match counted, the page's (id, score) and their rows.
        struct Found {
            total: usize,
            page: Vec<(i64, f64)>,
            rows: Vec<ProductRow>,
        }
        let found: Option<Found> = on_db!(&self.db, pool => async {
            let mut connection = pool.acquire().await?;
            let query = sqlx::query_as(&sql).bind(&engine_query);
            let query = if mysql { query.bind(&engine_query) } else { query };
            let matches: Vec<(i64, f64)> = query.bind(FEW_MATCHES + 1).fetch_all(&mut *connection).await?;
            if matches.len() as i64 > FEW_MATCHES {
                return Ok::<_, sqlx::Error>(None);
            }
            let total = matches.len();
            let page: Vec<(i64, f64)> =
                matches.into_iter().filter(on_page).take(q.limit.max(0) as usize).collect();
            let Some(&(last_id, _)) = page.last() else { return Ok(Some(Found { total, page, rows: Vec::new() })) };
            // Padded to a power of two of places, so that few statements
            // are prepared.
            let places = page.len().next_power_of_two();
            let by_ids =
                format!("SELECT {COLUMNS} FROM products WHERE id IN ({})", vec!["?"; places].join(", "));
            let mut query = sqlx::query_as(&by_ids);
            for place in 0..places {
                query = query.bind(page.get(place).map_or(last_id, |(id, _)| *id));
            }
            let rows = query.fetch_all(&mut *connection).await?;
            Ok(Some(Found { total, page, rows }))
        }
        .await)?;
        let Some(Found { total, page, rows }) = found else { return Ok(None) };
        let mut rows: HashMap<i64, ProductRow> = rows.into_iter().map(|row| (row.id, row)).collect();
        // A product deleted since the engine found it is left out.
        let (mut kept, mut scores) = (Vec::with_capacity(page.len()), Vec::with_capacity(page.len()));
        for (id, score) in page {
            if let Some(row) = rows.remove(&id) {
                kept.push(row);
                scores.push(score);
            }
        }
        Ok(Some(Page {
            rows: kept,
            scores,
            total_size: total as i64,
            path: Some(SearchPath::Few),
            ..Page::default()
        }))
    }

    /// The (score, id) a relevance page of the engine goes on after.
    fn relevance_after(q: &ListQuery<'_>) -> Result<Option<(f64, i64)>, ApiError> {
        match q.after {
            None => Ok(None),
            Some(&Cursor::Ranked(Ranked::Engine { score, id })) => Ok(Some((score, id))),
            Some(_) => Err(invalid_token()),
        }
    }

    /// The statement of a search for `words` (not empty), and its parameters.
    pub(super) fn search_statement(
        &self,
        q: &ListQuery<'_>,
        words: &Words,
    ) -> Result<(String, Vec<ListParam>), ApiError> {
        let mysql = self.db.backend() == Backend::MySql;
        let engine_query = ListParam::Text(if mysql { words.mysql() } else { words.fts5() });
        let relevance = q.order.field == SortField::Relevance;
        let after_score = if relevance { Self::relevance_after(q)? } else { None };
        if relevance && !mysql {
            return Ok(Self::fts5_ranked_statement(engine_query, after_score, q.limit));
        }
        let mut params = vec![engine_query.clone()];
        // The score column, and how a condition names it. On SQLite the
        // matches are read from the FTS5 table first (CROSS JOIN keeps
        // that order) and each joins its product by id; bm25() is lower
        // for better matches, so it is negated to read as MySQL's.
        let (mut sql, score) = if mysql {
            params.push(engine_query.clone());
            (
                format!("SELECT {COLUMNS}, {MYSQL_MATCH} AS score FROM products WHERE {MYSQL_MATCH}"),
                MYSQL_MATCH,
            )
        } else {
            (
                format!(
                    "SELECT {COLUMNS}, matches.score AS score FROM \
                     (SELECT rowid AS match_id, -bm25(products_search) AS score FROM products_search \
                      WHERE products_search MATCH ?) AS matches \
                     CROSS JOIN products ON products.id = matches.match_id WHERE 1 = 1"
                ),
                "matches.score",
            )
        };
        if relevance {
            if let Some((last, after_id)) = after_score {
                sql.push_str(&format!(" AND ({score} < ? OR ({score} = ? AND products.id > ?))"));
                if mysql {
                    params.extend([engine_query.clone(), ListParam::Float(last), engine_query.clone()]);
                } else {
                    params.push(ListParam::Float(last));
                }
                params.extend([ListParam::Float(last), ListParam::Int(after_id)]);
            }
            sql.push_str(" ORDER BY score DESC, products.id ASC LIMIT ?");
        } else {
            self.keyset(q, &mut sql, &mut params)?;
        }
        params.push(ListParam::Int(q.limit));
        Ok((sql, params))
    }

    /// SQLite's relevance page, ranked in the full-text index alone: bm25()
    /// of every match, then only the page's rows are read from `products`
    /// (joining every match first and sorting the joined rows read the
    /// table once per match: 2.2 s for a common word in a million products).
    fn fts5_ranked_statement(
        engine_query: ListParam,
        after: Option<(f64, i64)>,
        limit: i64,
    ) -> (String, Vec<ListParam>) {
        let mut params = vec![engine_query];
        let mut ranked = String::from(
            "SELECT match_id, score FROM \
             (SELECT rowid AS match_id, -bm25(products_search) AS score FROM products_search \
              WHERE products_search MATCH ?)",
        );
        if let Some((last, after_id)) = after {
            ranked.push_str(" WHERE score < ? OR (score = ? AND match_id > ?)");
            params.extend([ListParam::Float(last), ListParam::Float(last), ListParam::Int(after_id)]);
        }
        ranked.push_str(" ORDER BY score DESC, match_id ASC LIMIT ?");
        params.push(ListParam::Int(limit));
        let sql = format!(
            "SELECT {COLUMNS}, page.score AS score FROM ({ranked}) AS page \
             CROSS JOIN products ON products.id = page.match_id ORDER BY page.score DESC, products.id ASC"
        );
        (sql, params)
    }

    /// How the database would run the listing `q`: what it says of the very
    /// statement [`Self::list`] runs for it (MySQL `EXPLAIN`, SQLite
    /// `EXPLAIN QUERY PLAN`), for `product-service check-plans` and tests.
    pub async fn plan(&self, q: &ListQuery<'_>) -> Result<Plan, ApiError> {
        let (sql, params) = match q.query.map(Words::of) {
            Some(words) if words.is_empty() => {
                return Ok(Plan {
                    steps: vec!["no word to search for: nothing is read".into()],
                    ..Plan::default()
                });
            }
            Some(words) => self.search_statement(q, &words)?,
            None => self.listing_statement(q)?,
        };
        Ok(match &self.db {
            Db::MySql(pool) => {
                let explain = format!("EXPLAIN {sql}");
                let rows =
                    bind_all!(sqlx::query(&explain), &params).persistent(false).fetch_all(pool).await?;
                Plan::of_mysql(&rows)
            }
            Db::Sqlite(pool) => {
                let explain = format!("EXPLAIN QUERY PLAN {sql}");
                // Not cached: a prepared EXPLAIN keeps the plan it was
                // prepared with, even after the schema changed.
                let rows: Vec<(i64, i64, i64, String)> =
                    bind_all!(sqlx::query_as(&explain), &params).persistent(false).fetch_all(pool).await?;
                Plan::of_sqlite(rows.into_iter().map(|row| row.3).collect())
            }
        })
    }

    /// A listing's rows read in-line, if that could be done now.
    fn list_inline(reads: &SqliteReads, sql: &str, params: &[ListParam]) -> Option<Vec<ListedRow>> {
        reads.read(|c| {
            let mut statement = c.prepare_cached(sql)?;
            // The unfiltered listing carries the total after the row.
            let with_total = statement.column_count() > EXTRA_COLUMN;
            let rows = statement.query_map(rusqlite::params_from_iter(params), |row| {
                Ok(ListedRow {
                    product: inline_row(row)?,
                    total_size: if with_total { row.get(EXTRA_COLUMN)? } else { None },
                    score: None,
                })
            })?;
            rows.collect()
        })
    }

    /// How many products there are, or match `query`. The unfiltered count
    /// is read from `product_counts` (16 rows, whatever the catalogue's
    /// size); a search's is counted in the full-text index, exact up to
    /// [`SearchBounds::exact_up_to`].
    pub async fn count(&self, query: Option<&str>) -> Result<i64, ApiError> {
        if let Some(query) = query {
            return self.count_matches(&Words::of(query)).await;
        }
        let shards: Vec<i64> = on_db!(&self.db, pool => {
            sqlx::query_scalar("SELECT products FROM product_counts").fetch_all(pool).await
        })?;
        Ok(shards.iter().sum())
    }

    /// How many products match `words`, at most
    /// [`SearchBounds::exact_up_to`]: FTS5 stops reading matches at the
    /// LIMIT inside; InnoDB finds all matches first, which is why a search
    /// estimated to match more is not run on the index at all.
    async fn count_matches(&self, words: &Words) -> Result<i64, ApiError> {
        if words.is_empty() {
            return Ok(0);
        }
        let (sql, engine_query) = match self.db.backend() {
            Backend::MySql => (
                format!(
                    "SELECT COUNT(*) FROM (SELECT 1 FROM products WHERE {MYSQL_MATCH} LIMIT ?) AS matches"
                ),
                words.mysql(),
            ),
            Backend::Sqlite => (
                "SELECT COUNT(*) FROM (SELECT 1 FROM products_search WHERE products_search MATCH ? LIMIT ?)"
                    .to_owned(),
                words.fts5(),
            ),
        };
        Ok(on_db!(&self.db, pool => {
            sqlx::query_scalar(&sql).bind(&engine_query).bind(self.searches.bounds.exact_up_to).fetch_one(pool).await
        })?)
    }
}
