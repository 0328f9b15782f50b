//! Every SQL statement of product-service. Placeholders are `?` on both
//! backends and the statements are shared; the one difference is how a
//! price travels: MySQL keeps DECIMAL(12,2) and takes "999.99", SQLite keeps
//! fixed-width text ("0000000999.99", so that text order is numeric order).
//! Both read it back through `CAST(price AS CHAR)`.

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

macro_rules! insert_product {
    () => {
        "INSERT INTO products (name, description, price, stock, version, created_by, updated_by, \
         create_time, update_time) VALUES (?, ?, ?, ?, 1, ?, ?, ?, ?)"
    };
}
const INSERT_PRODUCT: &str = insert_product!();
const INSERT_PRODUCT_RETURNING: &str = concat!(insert_product!(), " RETURNING ", columns!());

/// AdjustStock's one conditional UPDATE: the stock never leaves
/// 0..=MAX_STOCK. Binds: delta, user, time, id, delta, delta, MAX_STOCK.
macro_rules! adjust_stock {
    () => {
        "UPDATE products SET stock = stock + ?, version = version + 1, updated_by = ?, update_time = ? \
         WHERE id = ? AND stock + ? >= 0 AND stock + ? <= ?"
    };
}
const ADJUST_STOCK: &str = adjust_stock!();
const ADJUST_STOCK_RETURNING: &str = concat!(adjust_stock!(), " RETURNING ", columns!());

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

/// What claiming a write's request id found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Claim {
    /// The write carries no request id.
    NoRequestId,
    /// Claimed in this transaction: the write goes on.
    Claimed,
    /// Claimed by a request in flight or done: its answer is to be read.
    Taken,
}

/// Claims `request`'s id in the transaction of `conn`, before the write it
/// guards. On [`Claim::Taken`] the caller commits its (empty) transaction,
/// which returns once the claim's own is done (on SQLite it may share its
/// group commit), and reads the recorded answer.
async fn claim_request_id<C>(
    conn: &mut C,
    request: Option<&RequestKey>,
    now: DateTime<Utc>,
) -> Result<Claim, sqlx::Error>
where
    C: sqlx::Connection,
    for<'e> &'e mut C: sqlx::Executor<'e, Database = C::Database>,
    for<'q> <C::Database as sqlx::Database>::Arguments<'q>: sqlx::IntoArguments<'q, C::Database>,
    for<'q> &'q str: sqlx::Encode<'q, C::Database> + sqlx::Type<C::Database>,
    for<'q> &'q [u8]: sqlx::Encode<'q, C::Database> + sqlx::Type<C::Database>,
    for<'q> DateTime<Utc>: sqlx::Encode<'q, C::Database> + sqlx::Type<C::Database>,
{
    let Some(request) = request else { return Ok(Claim::NoRequestId) };
    let claimed = sqlx::query::<C::Database>(
        "INSERT INTO product_request_ids (caller, request_id, request_hash, created_at) VALUES (?, ?, ?, ?)",
    )
    .bind(request.caller.as_str())
    .bind(request.id.as_str())
    .bind(request.hash.as_slice())
    .bind(now)
    .execute(conn)
    .await;
    match claimed {
        Ok(_) => Ok(Claim::Claimed),
        Err(e) if is_unique_violation(&e) => Ok(Claim::Taken),
        Err(e) => Err(e),
    }
}

/// Records the answer of an idempotent write under its request id, in the
/// transaction of `conn`.
async fn record_response<C>(
    conn: &mut C,
    request: Option<&RequestKey>,
    product: &Product,
) -> Result<(), sqlx::Error>
where
    C: sqlx::Connection,
    for<'e> &'e mut C: sqlx::Executor<'e, Database = C::Database>,
    for<'q> <C::Database as sqlx::Database>::Arguments<'q>: sqlx::IntoArguments<'q, C::Database>,
    for<'q> &'q str: sqlx::Encode<'q, C::Database> + sqlx::Type<C::Database>,
    for<'q> Vec<u8>: sqlx::Encode<'q, C::Database> + sqlx::Type<C::Database>,
{
    let Some(request) = request else { return Ok(()) };
    sqlx::query::<C::Database>(
        "UPDATE product_request_ids SET response = ? WHERE caller = ? AND request_id = ?",
    )
    .bind(product.encode_to_vec())
    .bind(request.caller.as_str())
    .bind(request.id.as_str())
    .execute(conn)
    .await?;
    Ok(())
}

/// Rows of `product_counts`: a product is counted in row `id % COUNT_SHARDS`
/// (see migrations/*/0003_product_counts.sql).
const COUNT_SHARDS: i64 = 16;

/// Adds `delta` to the count of products, in the transaction of `conn`
/// beside the write that made the difference, so the count is exact
/// whenever the write commits.
async fn count_products<C>(conn: &mut C, id: i64, delta: i64) -> Result<(), sqlx::Error>
where
    C: sqlx::Connection,
    for<'e> &'e mut C: sqlx::Executor<'e, Database = C::Database>,
    for<'q> <C::Database as sqlx::Database>::Arguments<'q>: sqlx::IntoArguments<'q, C::Database>,
    for<'q> i64: sqlx::Encode<'q, C::Database> + sqlx::Type<C::Database>,
{
    sqlx::query::<C::Database>("UPDATE product_counts SET products = products + ? WHERE shard = ?")
        .bind(delta)
        .bind(id % COUNT_SHARDS)
        .execute(conn)
        .await?;
    Ok(())
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

/// MySQL's relevance of a row, and its filter: `?` is `Words::mysql`. The
/// columns are those of the FULLTEXT index (migrations/mysql/0006).
const MYSQL_MATCH: &str = "MATCH (products.name, products.description) AGAINST (? IN BOOLEAN MODE)";

/// A search by relevance with at most this many matches finds them all in
/// one statement ([`ProductStore::search_few`]).
const FEW_MATCHES: i64 = 1000;

// Declared after the macros they use.
mod anchored;
mod broad;
// The hot reads' own paths.
mod mysql_reads;
mod shared_reads;
mod sqlite_reads;
use anchored::Anchored;
use broad::Searches;
pub use broad::{SearchCounts, SearchLabels, SearchPath};
use mysql_reads::MySqlReads;
pub use shared_reads::SharedCounts;
use shared_reads::{SharedReads, Sharing};
pub use sqlite_reads::ReadCounts;
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

    /// On SQLite, how many reads were done in-line and how many gave way.
    pub fn inline_read_counts(&self) -> Option<ReadCounts> {
        match &self.reads {
            Some(Reads::Sqlite(reads)) => Some(reads.counts()),
            _ => None,
        }
    }

    /// On MySQL, how many statements the gets that shared them ran, and how
    /// many gets they answered.
    pub fn shared_get_counts(&self) -> Option<SharedCounts> {
        match &self.reads {
            Some(Reads::MySql(reads)) => Some(reads.gets.counts()),
            _ => None,
        }
    }

    /// On MySQL, how many read connections are idle, ready to be lent.
    pub fn idle_read_connections(&self) -> Option<usize> {
        match &self.reads {
            Some(Reads::MySql(reads)) => Some(reads.connections.idle_connections()),
            _ => None,
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
                return Ok(reads.gets.read(&reads.connections, id, read_by_ids).await?);
            }
            None => {}
        }
        Ok(on_db!(&self.db, pool => sqlx::query_as(SELECT_BY_ID).bind(id).fetch_optional(pool).await)?)
    }

    /// The recorded answer of the caller's earlier request with this id.
    async fn replay<T>(&self, request: &RequestKey) -> Result<Idempotent<T>, ApiError> {
        let recorded: Option<(Vec<u8>, Option<Vec<u8>>)> = on_db!(&self.db, pool => {
            sqlx::query_as(
                "SELECT request_hash, response FROM product_request_ids WHERE caller = ? AND request_id = ?",
            )
            .bind(&request.caller)
            .bind(&request.id)
            .fetch_optional(pool)
            .await
        })?;
        match recorded {
            Some((hash, _)) if hash != request.hash => Ok(Idempotent::Conflict),
            Some((_, Some(response))) => Ok(Idempotent::Replayed(
                Product::decode(response.as_slice()).map_err(|e| ApiError::Internal(e.into()))?,
            )),
            // The first call rolled back in between: nothing is recorded.
            _ => Err(ApiError::Aborted("a concurrent request with this request_id did not finish; retry")),
        }
    }

    /// Inserts a product; with a request id, in the same transaction that
    /// claims the id (a unique key), so that concurrent retries wait for the
    /// first and then read its answer.
    pub async fn create(
        &self,
        fields: &ProductFields,
        request: Option<&RequestKey>,
        user_id: Option<i64>,
        now: DateTime<Utc>,
    ) -> Result<Idempotent<Product>, ApiError> {
        let price = &self.price_param(fields.price);
        let returning = self.returns_written_rows();
        // An async block, so that `return` leaves only the transaction.
        let created: Option<Product> = retry_conflicts(move || async move {
            on_db!(&self.db, pool => async {
            let mut tx = pool.begin_write().await?;
            if claim_request_id(&mut *tx, request, now).await? == Claim::Taken {
                tx.commit().await?;
                return Ok(None);
            }
            let insert = sqlx::query(if returning { INSERT_PRODUCT_RETURNING } else { INSERT_PRODUCT })
                .bind(&fields.name)
                .bind(&fields.description)
                .bind(price)
                .bind(fields.stock)
                .bind(user_id)
                .bind(user_id)
                .bind(now)
                .bind(now);
            let row: ProductRow = if returning {
                sqlx::FromRow::from_row(&insert.fetch_one(&mut *tx).await?)?
            } else {
                let id = insert.execute(&mut *tx).await?.insert_id();
                sqlx::query_as(SELECT_BY_ID).bind(id).fetch_one(&mut *tx).await?
            };
            count_products(&mut *tx, row.id, 1).await?;
            let product = row.into_product()?;
            record_response(&mut *tx, request, &product).await?;
            tx.commit().await?;
            Ok(Some(product))
        }
        .await)
        })
        .await?;
        match (created, request) {
            (Some(product), _) => Ok(Idempotent::Fresh(product)),
            (None, Some(request)) => self.replay(request).await,
            (None, None) => {
                Err(ApiError::Internal(anyhow::anyhow!("insert reported a duplicate without a request id")))
            }
        }
    }

    /// Inserts `products` in one transaction, [`IMPORT_BATCH`] rows per
    /// statement, and counts them: for loading a catalogue in bulk, a
    /// million products in under 90 s here, where CreateProduct's
    /// transaction per product takes 6 to 14 minutes (BENCHMARKS.md). No
    /// request ids: a failed import rolls back whole and is run again. The
    /// full-text index is kept in the same transaction (InnoDB's FULLTEXT,
    /// the FTS5 table's triggers), as for every write.
    pub async fn import(
        &self,
        products: &[ProductFields],
        user_id: Option<i64>,
        now: DateTime<Utc>,
    ) -> Result<(), ApiError> {
        if products.is_empty() {
            return Ok(());
        }
        // What searches know of the catalogue's words may change wholly.
        self.forget_search_sample();
        retry_conflicts(move || async move {
            on_db!(&self.db, pool => async {
            let mut tx = pool.begin_write().await?;
            let mut first_id = None;
            for batch in products.chunks(IMPORT_BATCH) {
                let mut sql = String::from(
                    "INSERT INTO products (name, description, price, stock, version, created_by, updated_by, \
                     create_time, update_time) VALUES ",
                );
                for i in 0..batch.len() {
                    sql.push_str(if i == 0 { "(?, ?, ?, ?, 1, ?, ?, ?, ?)" } else { ", (?, ?, ?, ?, 1, ?, ?, ?, ?)" });
                }
                let mut insert = sqlx::query(&sql);
                for fields in batch {
                    insert = insert
                        .bind(&fields.name)
                        .bind(&fields.description)
                        .bind(self.price_param(fields.price))
                        .bind(fields.stock)
                        .bind(user_id)
                        .bind(user_id)
                        .bind(now)
                        .bind(now);
                }
                let id = insert.execute(&mut *tx).await?.insert_id();
                first_id.get_or_insert(id);
            }
            // The shards only spread concurrent writers over rows; the count
            // is their sum, so the whole import may go to one of them.
            count_products(&mut *tx, first_id.unwrap_or_default(), products.len() as i64).await?;
            tx.commit().await?;
            Ok(())
        }
        .await)
        })
        .await
    }

    /// Merges SQLite's full-text index into one segment, after a bulk
    /// import: FTS5 adds segments with every transaction and merges only
    /// some of them as it goes, and every search reads every segment. One
    /// write transaction of a few seconds per million products. MySQL's
    /// FULLTEXT keeps one index per word and needs nothing.
    pub async fn optimize_search_index(&self) -> Result<(), ApiError> {
        if let Db::Sqlite(pool) = &self.db {
            sqlx::query("INSERT INTO products_search (products_search) VALUES ('optimize')")
                .execute(pool)
                .await?;
        }
        Ok(())
    }

    /// Adds `delta` to the stock in one conditional UPDATE: concurrent
    /// adjustments serialise in the database and the stock never leaves
    /// 0..=MAX_STOCK. With a request id, claimed in the same transaction.
    pub async fn adjust_stock(
        &self,
        id: i64,
        delta: i64,
        request: Option<&RequestKey>,
        user_id: Option<i64>,
        now: DateTime<Utc>,
    ) -> Result<Idempotent<Adjusted>, ApiError> {
        let returning = self.returns_written_rows();
        let adjusted: Option<Adjusted> = retry_conflicts(move || async move { on_db!(&self.db, pool => async {
            let mut tx = pool.begin_write().await?;
            if claim_request_id(&mut *tx, request, now).await? == Claim::Taken {
                tx.commit().await?;
                return Ok(None);
            }
            let update = sqlx::query(if returning { ADJUST_STOCK_RETURNING } else { ADJUST_STOCK })
                .bind(delta)
                .bind(user_id)
                .bind(now)
                .bind(id)
                .bind(delta)
                .bind(delta)
                .bind(MAX_STOCK);
            let adjusted: Option<ProductRow> = if returning {
                update.fetch_optional(&mut *tx).await?.map(|row| sqlx::FromRow::from_row(&row)).transpose()?
            } else if update.execute(&mut *tx).await?.rows_affected() == 1 {
                Some(sqlx::query_as(SELECT_BY_ID).bind(id).fetch_one(&mut *tx).await?)
            } else {
                None
            };
            let Some(row) = adjusted else {
                // Nothing changed; the transaction (and the claim) roll back.
                let exists = sqlx::query("SELECT 1 FROM products WHERE id = ?").bind(id).fetch_optional(&mut *tx).await?;
                return Ok(Some(if exists.is_some() { Adjusted::OutOfRange } else { Adjusted::NotFound }));
            };
            let product = row.into_product()?;
            record_response(&mut *tx, request, &product).await?;
            tx.commit().await?;
            Ok(Some(Adjusted::Done(product)))
        }
        .await) })
        .await?;
        match (adjusted, request) {
            (Some(adjusted), _) => Ok(Idempotent::Fresh(adjusted)),
            (None, Some(request)) => self.replay(request).await,
            (None, None) => {
                Err(ApiError::Internal(anyhow::anyhow!("update reported a duplicate without a request id")))
            }
        }
    }

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
    async fn listed_rows(&self, q: &ListQuery<'_>) -> Result<Vec<ListedRow>, ApiError> {
        let (sql, params) = self.listing_statement(q)?;
        let rows = match &self.reads {
            Some(Reads::Sqlite(reads)) => Self::list_inline(reads, &sql, &params),
            Some(Reads::MySql(reads)) => {
                let page = Arc::new(PageRead { sql, params });
                return Ok(reads.pages.read(&reads.connections, page, read_page).await?);
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
            (Some(_), _) => return Err(ApiError::invalid("page_token", "is not valid")),
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
                let matches = sample.estimate(&terms);
                match ranked {
                    Ranked::Engine { .. } => Route::Engine { matches },
                    // Any word anchors the same matches; the rarest reads
                    // fewest.
                    Ranked::Anchored { .. } => Route::Anchored { term: sample.rarest(&terms), matches },
                    Ranked::Broad { .. } => Route::Broad { matches },
                }
            }
            _ => sample.route(&terms, &self.searches.bounds, self.db.backend()),
        };
        if let Route::Anchored { term, .. } = route {
            match self.anchored_search(q, words, term, &sample).await? {
                Anchored::Page(page) => {
                    self.searches.count(SearchPath::Anchored);
                    return Ok(page);
                }
                // Its page token must not change how it is ranked.
                Anchored::NotRare if q.after.is_some() && q.order.field == SortField::Relevance => {
                    return Err(ApiError::invalid(
                        "page_token",
                        "has expired: the catalogue changed too much since the listing began; start again without it",
                    ));
                }
                // The sample's estimate of the word was low: read broad.
                Anchored::NotRare => {}
            }
        }
        let estimate = route.matches();
        if !matches!(route, Route::Engine { .. }) {
            self.searches.count(SearchPath::Broad);
            return self.broad_search(q, words, &sample, estimate).await;
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
            Some(_) => Err(ApiError::invalid("page_token", "is not valid")),
        }
    }

    /// The statement of a search for `words` (not empty), and its parameters.
    fn search_statement(
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

    /// Counts the products afresh into `product_counts`, for when writers
    /// that did not keep the count (a version before it, someone's SQL) have
    /// written. Exact against writers that keep it: the count rows are
    /// locked first (the UPDATE), and MySQL takes its read snapshot at the
    /// first plain SELECT, the COUNT after it; a concurrent create or delete
    /// either committed before or updates its row after. Creates and deletes
    /// wait for the length of the scan.
    pub async fn recount(&self) -> Result<i64, ApiError> {
        retry_conflicts(move || async move {
            on_db!(&self.db, pool => async {
            let mut tx = pool.begin_write().await?;
            sqlx::query("UPDATE product_counts SET products = 0").execute(&mut *tx).await?;
            let counts: Vec<(i64, i64)> = sqlx::query_as(&format!(
                "SELECT id % {COUNT_SHARDS}, COUNT(*) FROM products GROUP BY id % {COUNT_SHARDS}"
            ))
            .fetch_all(&mut *tx)
            .await?;
            for (shard, products) in &counts {
                sqlx::query("UPDATE product_counts SET products = ? WHERE shard = ?")
                    .bind(products)
                    .bind(shard)
                    .execute(&mut *tx)
                    .await?;
            }
            tx.commit().await?;
            Ok(counts.iter().map(|(_, products)| products).sum())
        }
        .await)
        })
        .await
    }

    /// Changes the fields `changes` sets, in one statement (at `version`
    /// only, when one is given: an etag), and reads what it wrote in the
    /// same transaction: the answer is this write's state, whatever comes
    /// after. Without a version the last writer wins field by field, so a
    /// concurrent write never makes an update fail.
    pub async fn update(
        &self,
        id: i64,
        changes: &FieldChanges,
        version: Option<i64>,
        user_id: Option<i64>,
        now: DateTime<Utc>,
    ) -> Result<Written<ProductRow>, ApiError> {
        let mut sets = String::new();
        let mut params = Vec::new();
        let mut set = |column: &str, param: ListParam| {
            sets.push_str(&format!("{column} = ?, "));
            params.push(param);
        };
        if let Some(name) = &changes.name {
            set("name", ListParam::Text(name.clone()));
        }
        if let Some(description) = &changes.description {
            set("description", ListParam::Text(description.clone()));
        }
        if let Some(price) = changes.price {
            set("price", ListParam::Text(self.price_param(price)));
        }
        if let Some(stock) = changes.stock {
            set("stock", ListParam::Int(stock));
        }
        let at_version = if version.is_some() { " AND version = ?" } else { "" };
        let sql = format!(
            "UPDATE products SET {sets}version = version + 1, updated_by = ?, update_time = ? WHERE id = ?{at_version}"
        );
        let (sql, params) = (&sql, &params);
        let written: Option<ProductRow> = retry_conflicts(move || async move {
            on_db!(&self.db, pool => async {
            let mut tx = pool.begin_write().await?;
            let query = bind_all!(sqlx::query(sql), params).bind(user_id).bind(now).bind(id);
            let query = match version {
                Some(version) => query.bind(version),
                None => query,
            };
            if query.execute(&mut *tx).await?.rows_affected() != 1 {
                return Ok::<_, ApiError>(None);
            }
            let row = sqlx::query_as(SELECT_BY_ID).bind(id).fetch_one(&mut *tx).await?;
            tx.commit().await?;
            Ok(Some(row))
        }
        .await)
        })
        .await?;
        if let Some(row) = written {
            return Ok(Written::Done(row));
        }
        Ok(if self.get(id).await?.is_some() { Written::VersionMismatch } else { Written::NotFound })
    }

    /// Deletes the product, only at `version` when one is given.
    pub async fn delete(&self, id: i64, version: Option<i64>) -> Result<Written<()>, ApiError> {
        let rows: u64 = retry_conflicts(move || async move { on_db!(&self.db, pool => async {
            let mut tx = pool.begin_write().await?;
            let rows = match version {
                Some(v) => sqlx::query("DELETE FROM products WHERE id = ? AND version = ?").bind(id).bind(v).execute(&mut *tx).await,
                None => sqlx::query("DELETE FROM products WHERE id = ?").bind(id).execute(&mut *tx).await,
            }?
            .rows_affected();
            if rows == 1 {
                count_products(&mut *tx, id, -1).await?;
            }
            tx.commit().await?;
            Ok::<_, ApiError>(rows)
        }
        .await) })
        .await?;
        if rows == 1 {
            return Ok(Written::Done(()));
        }
        Ok(if self.get(id).await?.is_some() { Written::VersionMismatch } else { Written::NotFound })
    }

    /// Forgets request ids older than `before` (they are kept at least a day),
    /// also those that replicas of an earlier version recorded in
    /// `product_requests` (migrations/*/0005).
    pub async fn sweep_request_ids(&self, before: DateTime<Utc>) -> Result<u64, ApiError> {
        let mut swept = 0;
        for table in ["product_request_ids", "product_requests"] {
            let sql = format!("DELETE FROM {table} WHERE created_at < ?");
            swept += on_db!(&self.db, pool => {
                sqlx::query(&sql).bind(before).execute(pool).await.map(|r| r.rows_affected())
            })?;
        }
        Ok(swept)
    }
}
