//! The product store's writes: CreateProduct, the bulk import,
//! AdjustStock, UpdateProduct, DeleteProduct, and what keeps them whole
//! (request ids claimed in the write's own transaction, the product count
//! beside it).

use super::*;

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

impl ProductStore {
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
