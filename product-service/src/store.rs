//! Every SQL statement of product-service. Placeholders are `?` on both
//! backends and the statements are shared; the one difference is how a
//! price travels: MySQL keeps DECIMAL(12,2) and takes "999.99", SQLite keeps
//! fixed-width text ("0000000999.99", so that text order is numeric order).
//! Both read it back through `CAST(price AS CHAR)`.
//!
//! Here: the store, its rows and GetProduct's read; in `store/`, by concern:
//! `writes` (creates, the import, stock, updates, deletes), `listing` (pages,
//! searches on the index and their routing, counts, plans), `anchored` and
//! `broad` (the other ways a search is answered), and the hot reads' own
//! paths: `sqlite_reads` (in-line on the calling thread), `mysql_reads`
//! (connections without a ping per query), `shared_reads` (one statement for
//! the reads waiting for a connection).

use std::{
    collections::HashMap,
    fmt::Write as _,
    sync::{Arc, LazyLock},
};

use chrono::{DateTime, SecondsFormat, Utc};
use prost::Message as _;
use rusqlite::{
    OptionalExtension as _,
    types::{ToSqlOutput, Type, Value, ValueRef},
};
use sqlx::MySqlConnection;
use storegate::{
    ApiError, Db,
    db::{Backend, BeginWrite as _, InsertId as _, is_unique_violation, retry_conflicts},
    on_db,
    pb::product::v1::Product,
};

use crate::{
    domain::{MAX_STOCK, OrderBy, Price, SortField, etag},
    page_token::{Cursor, Ranked},
    plan::Plan,
    search::{Terms, Words},
    search_sample::{Route, Sample, SearchBounds},
};

/// The columns of a product row, in [`ProductRow`]'s order (the in-line
/// SQLite reads take them by position).
macro_rules! columns {
    () => {
        "id, name, description, CAST(price AS CHAR) AS price, stock, version, \
         created_by, updated_by, create_time, update_time"
    };
}
const COLUMNS: &str = columns!();

/// A [`ProductRow`] from the positions of [`columns!`]: `$row.$get(i)`
/// reads column `i`, `$time(i)` a time (the in-line reads decode those
/// their own way).
macro_rules! product_row {
    ($row:ident.$get:ident, $time:expr) => {
        ProductRow {
            id: $row.$get(0)?,
            name: $row.$get(1)?,
            description: $row.$get(2)?,
            price: $row.$get(3)?,
            stock: $row.$get(4)?,
            version: $row.$get(5)?,
            created_by: $row.$get(6)?,
            updated_by: $row.$get(7)?,
            create_time: $time(8)?,
            update_time: $time(9)?,
        }
    };
}
const SELECT_BY_ID: &str = concat!("SELECT ", columns!(), " FROM products WHERE id = ?");

/// Point reads that share a statement on MySQL: at most this many ids in one
/// `IN (…)`.
const SHARED_GETS: usize = 32;

/// `SELECT … WHERE id IN (?, …)` with 1, 2, 4 … [`SHARED_GETS`] places: a few
/// statements each connection prepares once; a list of ids is padded to
/// the next size by repeating its last id.
static SELECT_BY_IDS: LazyLock<Vec<String>> = LazyLock::new(|| {
    (0..=SHARED_GETS.trailing_zeros())
        .map(|bits| {
            format!("SELECT {COLUMNS} FROM products WHERE id IN ({})", vec!["?"; 1 << bits].join(", "))
        })
        .collect()
});

#[derive(Clone, Debug)]
pub struct ProductStore {
    db: Db,
    /// How gets and keyset pages are read; `None`: through the pool.
    reads: Option<Reads>,
    /// What searches know of the catalogue's words, and their bounds.
    searches: Arc<Searches>,
}

/// The hot reads' own path on each backend.
#[derive(Clone, Debug)]
enum Reads {
    /// In-line on the calling thread first (`store::sqlite_reads`); the
    /// pool is their fallback.
    Sqlite(Arc<SqliteReads>),
    /// Connections without sqlx's ping after each query
    /// (`store::mysql_reads`), and statements shared by the reads
    /// waiting for one (`store::shared_reads`).
    MySql(Arc<MySqlShared>),
}

/// One figure of the hot reads' own connections, read when scraped.
#[derive(Debug, Clone, Copy)]
enum ReadFigure {
    IdleConnections,
    SharedStatements,
    SharedAnswers,
    InlineDone,
    InlineGaveWay,
}

#[derive(Debug)]
struct ReadMetric {
    reads: Reads,
    figure: ReadFigure,
}

impl prometheus_client::encoding::EncodeMetric for ReadMetric {
    fn encode(&self, mut encoder: prometheus_client::encoding::MetricEncoder) -> Result<(), std::fmt::Error> {
        use prometheus_client::encoding::NoLabelSet;
        let counter = |encoder: &mut prometheus_client::encoding::MetricEncoder, value: u64| {
            encoder.encode_counter::<NoLabelSet, _, u64>(&value, None)
        };
        match (&self.reads, self.figure) {
            (Reads::MySql(reads), ReadFigure::IdleConnections) => {
                encoder.encode_gauge(&(reads.connections.idle_connections() as i64))
            }
            (Reads::MySql(reads), ReadFigure::SharedStatements) => {
                counter(&mut encoder, reads.gets.counts().statements)
            }
            (Reads::MySql(reads), ReadFigure::SharedAnswers) => {
                counter(&mut encoder, reads.gets.counts().answers)
            }
            (Reads::Sqlite(reads), ReadFigure::InlineDone) => counter(&mut encoder, reads.counts().done),
            (Reads::Sqlite(reads), ReadFigure::InlineGaveWay) => {
                counter(&mut encoder, reads.counts().gave_way)
            }
            _ => Ok(()),
        }
    }

    fn metric_type(&self) -> prometheus_client::metrics::MetricType {
        match self.figure {
            ReadFigure::IdleConnections => prometheus_client::metrics::MetricType::Gauge,
            _ => prometheus_client::metrics::MetricType::Counter,
        }
    }
}

/// The MySQL read connections and the reads queued for them.
#[derive(Debug)]
struct MySqlShared {
    connections: Arc<MySqlReads>,
    /// Gets by id: any waiting ids share one `IN (…)`.
    gets: SharedReads<i64, Option<ProductRow>>,
    /// Keyset pages: callers waiting for the very same page share its
    /// statement (a catalogue's first page is asked for most).
    pages: SharedReads<Arc<PageRead>, Vec<ListedRow>>,
}

/// A page's statement and its parameters (compared in this order: the
/// parameters differ more often and are shorter).
#[derive(Debug, PartialEq)]
struct PageRead {
    params: Vec<ListParam>,
    sql: String,
}

/// A row of a listing: the product, without a query the total count, with
/// one the row's relevance.
#[derive(Clone, Debug)]
struct ListedRow {
    product: ProductRow,
    total_size: Option<i64>,
    score: Option<f64>,
}

impl<'r, R: sqlx::Row> sqlx::FromRow<'r, R> for ListedRow
where
    ProductRow: sqlx::FromRow<'r, R>,
    usize: sqlx::ColumnIndex<R>,
    i64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    f64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
{
    fn from_row(row: &'r R) -> sqlx::Result<Self> {
        use sqlx::Column as _;
        let (mut total_size, mut score) = (None, None);
        if let Some(extra) = row.columns().get(EXTRA_COLUMN) {
            if extra.name() == "score" {
                score = row.try_get(EXTRA_COLUMN)?;
            } else {
                total_size = row.try_get(EXTRA_COLUMN)?;
            }
        }
        Ok(ListedRow { product: ProductRow::from_row(row)?, total_size, score })
    }
}

/// One page of a listing and how many products the listing has in all.
#[derive(Default)]
pub struct Page {
    pub rows: Vec<ProductRow>,
    /// A search's relevance of each row (higher is better); empty without
    /// a query.
    pub scores: Vec<f64>,
    pub total_size: i64,
    /// How a search was answered; `None` for a listing without a query.
    pub path: Option<SearchPath>,
    /// Where the listing goes on after each row, when the store says so: a
    /// search ranked in Rust (`store::broad`, `store::anchored`) marks its
    /// cursors so that the next page is ranked the same way. Empty: the
    /// cursor is the row's own ([`Cursor::after`], [`Cursor::after_match`]).
    pub cursors: Vec<Cursor>,
    /// Where the listing goes on when this page has fewer rows than asked
    /// but the listing may have more: a broad search stopped at its bound
    /// on rows read.
    pub resume: Option<Cursor>,
}

/// A product as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProductRow {
    pub id: i64,
    pub name: String,
    pub description: String,
    pub price: String,
    pub stock: i64,
    pub version: i64,
    pub created_by: Option<i64>,
    pub updated_by: Option<i64>,
    pub create_time: DateTime<Utc>,
    pub update_time: DateTime<Utc>,
}

/// Read by the positions of [`columns!`] (a lookup by name per column and
/// row showed in profiles of 50-row pages).
impl<'r, R: sqlx::Row> sqlx::FromRow<'r, R> for ProductRow
where
    usize: sqlx::ColumnIndex<R>,
    i64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    String: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    DateTime<Utc>: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
{
    fn from_row(row: &'r R) -> sqlx::Result<Self> {
        Ok(product_row!(row.try_get, |i: usize| row.try_get(i)))
    }
}

fn timestamp(t: DateTime<Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp { seconds: t.timestamp(), nanos: t.timestamp_subsec_nanos() as i32 }
}

impl ProductRow {
    fn price(&self) -> Result<Price, ApiError> {
        Price::parse(&self.price)
            .map_err(|why| ApiError::Internal(anyhow::anyhow!("stored price of product {} {why}", self.id)))
    }

    pub fn fields(&self) -> Result<ProductFields, ApiError> {
        Ok(ProductFields {
            name: self.name.clone(),
            description: self.description.clone(),
            price: self.price()?,
            stock: self.stock,
        })
    }

    /// The API message: prices always with two fraction digits.
    pub fn into_product(self) -> Result<Product, ApiError> {
        let price = self.price()?;
        // The stored text's buffer takes the API's spelling of the price.
        let mut price_text = self.price;
        price_text.clear();
        write!(price_text, "{price}").map_err(|e| ApiError::Internal(e.into()))?;
        Ok(Product {
            price: price_text,
            id: self.id,
            name: self.name,
            description: self.description,
            stock: self.stock,
            etag: etag(self.version),
            create_time: Some(timestamp(self.create_time)),
            update_time: Some(timestamp(self.update_time)),
            created_by: self.created_by.unwrap_or_default(),
            updated_by: self.updated_by.unwrap_or_default(),
        })
    }
}

/// The fields a client chooses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProductFields {
    pub name: String,
    pub description: String,
    pub price: Price,
    pub stock: i64,
}

/// What an update changes: the fields it sets; the others keep their value.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct FieldChanges {
    pub name: Option<String>,
    pub description: Option<String>,
    pub price: Option<Price>,
    pub stock: Option<i64>,
}

/// A client's idempotency key and what identifies its request.
pub struct RequestKey {
    /// Who sent it (the access token's `sub`): request ids are the caller's
    /// own, another caller's same id is another request.
    pub caller: String,
    pub id: String,
    /// SHA-256 of the method and the request body.
    pub hash: Vec<u8>,
}

/// The answer to a write that may carry a request id.
pub enum Idempotent<T> {
    /// Done now.
    Fresh(T),
    /// The same request was done before: its recorded answer.
    Replayed(Product),
    /// The request id was used before for a different request.
    Conflict,
}

/// What a conditional write found.
pub enum Written<T> {
    Done(T),
    NotFound,
    /// The product exists at another version.
    VersionMismatch,
}

/// What AdjustStock found.
pub enum Adjusted {
    Done(Product),
    NotFound,
    /// The stock would leave 0..=MAX_STOCK.
    OutOfRange,
}

/// One page of a listing.
pub struct ListQuery<'a> {
    pub order: OrderBy,
    /// Words of name or description (see `crate::search`).
    pub query: Option<&'a str>,
    pub after: Option<&'a Cursor>,
    pub limit: i64,
}

/// A listing's parameter, bound to the pool's statement or to the in-line
/// read's as the same value.
#[derive(Clone, Debug, PartialEq)]
enum ListParam {
    Text(String),
    Time(DateTime<Utc>),
    Int(i64),
    Float(f64),
}

impl rusqlite::ToSql for ListParam {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(match self {
            ListParam::Text(text) => ToSqlOutput::Borrowed(ValueRef::Text(text.as_bytes())),
            // The text sqlx binds for a time on SQLite, so both compare alike.
            ListParam::Time(time) => {
                ToSqlOutput::Owned(Value::Text(time.to_rfc3339_opts(SecondsFormat::AutoSi, false)))
            }
            ListParam::Int(n) => ToSqlOutput::Owned(Value::Integer(*n)),
            ListParam::Float(x) => ToSqlOutput::Owned(Value::Real(*x)),
        })
    }
}

/// `$query` with every listing parameter bound, in order.
macro_rules! bind_all {
    ($query:expr, $params:expr) => {{
        let mut query = $query;
        for param in $params {
            query = match param {
                ListParam::Text(text) => query.bind(text),
                ListParam::Time(time) => query.bind(time),
                ListParam::Int(n) => query.bind(n),
                ListParam::Float(x) => query.bind(x),
            };
        }
        query
    }};
}

/// A product row read in-line, by the positions of [`columns!`]. Times are
/// read as the RFC 3339 text the service writes; any other stored form fails
/// here and is read through the pool, which decodes every form.
fn inline_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<ProductRow> {
    let time = |i: usize| -> rusqlite::Result<DateTime<Utc>> {
        let text = row.get_ref(i)?.as_str()?;
        DateTime::parse_from_rfc3339(text)
            .map(|t| t.with_timezone(&Utc))
            .map_err(|e| rusqlite::Error::FromSqlConversionFailure(i, Type::Text, Box::new(e)))
    };
    Ok(product_row!(row.get, time))
}

/// The products with these ids, in one statement: for each id its row, or
/// `None` where there is none.
async fn read_by_ids(connection: &mut MySqlConnection, ids: &[i64]) -> sqlx::Result<Vec<Option<ProductRow>>> {
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    let places = ids.len().next_power_of_two();
    let Some(sql) = SELECT_BY_IDS.get(places.trailing_zeros() as usize) else {
        return Err(sqlx::Error::Protocol(format!("{} ids in one read, more than {SHARED_GETS}", ids.len())));
    };
    let mut query = sqlx::query_as(sql);
    for place in 0..places {
        query = query.bind(ids[place.min(ids.len() - 1)]);
    }
    let mut rows: Vec<ProductRow> = query.fetch_all(connection).await?;
    Ok(ids
        .iter()
        .enumerate()
        .map(|(i, id)| {
            let found = rows.iter().position(|row| row.id == *id)?;
            // The row is moved to its last asker, cloned for any before.
            Some(if ids[i + 1..].contains(id) { rows[found].clone() } else { rows.swap_remove(found) })
        })
        .collect())
}

/// One page, read once for every caller that asked for it.
async fn read_page(
    connection: &mut MySqlConnection,
    callers: &[Arc<PageRead>],
) -> sqlx::Result<Vec<Vec<ListedRow>>> {
    let Some(page) = callers.first() else { return Ok(Vec::new()) };
    let rows: Vec<ListedRow> =
        bind_all!(sqlx::query_as(&page.sql), &page.params).fetch_all(connection).await?;
    let mut answers = vec![rows.clone(); callers.len() - 1];
    answers.push(rows);
    Ok(answers)
}

/// On SQLite, the full-text index's changes of a group commit: queued by
/// the triggers while the group is open, written to the index once before
/// its COMMIT (migrations/sqlite/0009_search_queue.sql), so that FTS5 does
/// not write a segment at each member's SAVEPOINT (BENCHMARKS.md, "SQLite
/// writes: checkpoints, RETURNING, one index write per group").
const SQLITE_SEARCH_QUEUE: storegate::sqlite_writes::GroupStatements =
    storegate::sqlite_writes::GroupStatements {
        at_begin: "UPDATE products_search_deferral SET deferred = 1",
        before_commit: "INSERT INTO products_search (products_search, rowid, name, description) \
        SELECT command, product_id, name, description FROM products_search_queue ORDER BY product_id, seq; \
        DELETE FROM products_search_queue; \
        UPDATE products_search_deferral SET deferred = 0",
    };

/// How many connections gets and keyset pages have on MySQL, beside the
/// pool's, unless configured: one per core, at most 16. Reads that wait for one share
/// its next statement, so fewer connections mean fewer statements and fewer
/// server threads to wake; on two cores shared with the server, 1 or 2 served
/// 40–80% more gets and pages than 8 (BENCHMARKS.md). Across a network, where
/// each statement waits a round trip, more may serve more different pages.
pub fn default_read_connections() -> usize {
    std::thread::available_parallelism().map_or(2, |cores| cores.get().min(16))
}

/// Most products one statement of [`ProductStore::import`] inserts: 8
/// parameters each, well inside both databases' limits (SQLite's is 32,766).
pub const IMPORT_BATCH: usize = 1000;

/// Where a listing's statement has its `total_size` (unfiltered) or its
/// `score` (a search): after the ten product columns.
const EXTRA_COLUMN: usize = 10;

// Declared after the macros they use.
mod anchored;
mod broad;
mod listing;
mod writes;
// The hot reads' own paths.
mod mysql_reads;
mod shared_reads;
mod sqlite_reads;
use anchored::Anchored;
use broad::Searches;
pub use broad::{SearchCounts, SearchLabels, SearchPath};
use mysql_reads::MySqlReads;
use shared_reads::{SharedReads, Sharing};
use sqlite_reads::SqliteReads;

impl ProductStore {
    pub async fn new(db: Db) -> Self {
        Self::with_read_connections(db, default_read_connections()).await
    }

    /// A store whose MySQL gets and keyset pages have `read_connections`
    /// connections of their own (unused on SQLite).
    pub async fn with_read_connections(db: Db, read_connections: usize) -> Self {
        if let Db::Sqlite(pool) = &db {
            storegate::sqlite_writes::run_in_every_group(pool, SQLITE_SEARCH_QUEUE);
        }
        let reads = match &db {
            Db::Sqlite(_) => SqliteReads::for_db(&db).await.map(|reads| Reads::Sqlite(Arc::new(reads))),
            Db::MySql(pool) => Some(Reads::MySql(Arc::new(MySqlShared {
                connections: MySqlReads::new(
                    (*pool.connect_options()).clone(),
                    read_connections.max(1),
                    pool.options().get_acquire_timeout(),
                ),
                gets: SharedReads::new(Sharing { up_to: SHARED_GETS, joins: |_, _| true }),
                pages: SharedReads::new(Sharing { up_to: usize::MAX, joins: |a, b| a == b }),
            }))),
        };
        ProductStore { db, reads, searches: Arc::default() }
    }

    /// This store with other bounds on a search's cost (tests bound small
    /// catalogues as a large one is bounded).
    pub fn with_search_bounds(mut self, bounds: SearchBounds) -> Self {
        self.searches = Arc::new(Searches::new(bounds));
        self
    }

    /// A store that reads only through the pool, also on SQLite: the
    /// reference the in-line reads are tested against.
    pub fn pool_only(db: Db) -> Self {
        ProductStore { db, reads: None, searches: Arc::default() }
    }

    /// Registers the hot reads' own connections beside the pool's metrics,
    /// read at each scrape: on MySQL the read connections idle and the
    /// statements gets shared; on SQLite the reads done in-line and those
    /// that gave way to the pool.
    pub fn register_read_metrics(&self, metrics: &storegate::metrics::Metrics) {
        let Some(reads) = &self.reads else { return };
        let figures: &[(&str, &str, ReadFigure)] = match reads {
            Reads::MySql(_) => &[
                (
                    "db_read_connections_idle",
                    "MySQL connections of GetProduct and unfiltered pages, idle",
                    ReadFigure::IdleConnections,
                ),
                (
                    "db_shared_get_statements",
                    "Statements run for GetProduct calls that waited for a read connection",
                    ReadFigure::SharedStatements,
                ),
                (
                    "db_shared_get_answers",
                    "GetProduct calls those statements answered",
                    ReadFigure::SharedAnswers,
                ),
            ],
            Reads::Sqlite(_) => &[
                (
                    "db_inline_reads",
                    "SQLite reads done in-line on the calling thread",
                    ReadFigure::InlineDone,
                ),
                (
                    "db_inline_reads_gave_way",
                    "SQLite reads that gave way to the pool (a lock, a stored form to decode)",
                    ReadFigure::InlineGaveWay,
                ),
            ],
        };
        for &(name, help, figure) in figures {
            metrics.register(name, help, ReadMetric { reads: reads.clone(), figure });
        }
    }

    pub fn db(&self) -> &Db {
        &self.db
    }

    /// Whether a write's statement hands back the row it wrote (SQLite's
    /// `RETURNING`), instead of a SELECT after it: one trip less to the
    /// connection's worker thread while the write holds SQLite's one write
    /// turn. MySQL has no `RETURNING` (MariaDB only on INSERT).
    fn returns_written_rows(&self) -> bool {
        self.db.backend() == Backend::Sqlite
    }

    /// A price as this backend's price column takes it.
    fn price_param(&self, price: Price) -> String {
        match self.db.backend() {
            Backend::MySql => price.to_string(),
            Backend::Sqlite => price.fixed_width(),
        }
    }

    pub async fn get(&self, id: i64) -> Result<Option<ProductRow>, ApiError> {
        match &self.reads {
            Some(Reads::Sqlite(reads)) => {
                if let Some(row) =
                    reads.read(|c| c.prepare_cached(SELECT_BY_ID)?.query_row([id], inline_row).optional())
                {
                    return Ok(row);
                }
            }
            Some(Reads::MySql(reads)) => {
                return Ok(reads.gets.read(&*reads.connections, id, read_by_ids).await?);
            }
            None => {}
        }
        Ok(on_db!(&self.db, pool => sqlx::query_as(SELECT_BY_ID).bind(id).fetch_optional(pool).await)?)
    }
}
