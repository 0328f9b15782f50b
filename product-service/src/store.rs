//! Every SQL statement of product-service. Placeholders are `?` on both
//! backends and each statement runs unchanged on SQLite and MySQL: prices go
//! in as exact decimal text (MySQL stores DECIMAL(12,2), SQLite the text) and
//! come out through `CAST(price AS CHAR)`, which both dialects read as text.

use chrono::{DateTime, Utc};
use storegate::{
    ApiError, Db,
    db::{InsertId as _, is_unique_violation},
    on_db,
};

use crate::domain::Price;

const COLUMNS: &str = "id, name, description, CAST(price AS CHAR) AS price, stock, version, \
                       create_time, update_time";

#[derive(Clone, Debug)]
pub struct ProductStore {
    db: Db,
}

/// A product as stored.
#[derive(sqlx::FromRow, Debug, Clone)]
pub struct ProductRow {
    pub id: i64,
    pub name: String,
    pub description: String,
    pub price: String,
    pub stock: i64,
    pub version: i64,
    pub create_time: DateTime<Utc>,
    pub update_time: DateTime<Utc>,
}

/// A product created with a request id, and the hash of that request.
#[derive(sqlx::FromRow)]
struct RequestRow {
    #[sqlx(flatten)]
    product: ProductRow,
    request_hash: Option<Vec<u8>>,
}

/// The fields a client chooses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProductFields {
    pub name: String,
    pub description: String,
    pub price: Price,
    pub stock: i64,
}

impl ProductRow {
    pub fn fields(&self) -> Result<ProductFields, ApiError> {
        Ok(ProductFields {
            name: self.name.clone(),
            description: self.description.clone(),
            price: Price::parse(&self.price).map_err(|why| {
                ApiError::Internal(anyhow::anyhow!("stored price of product {} {why}", self.id))
            })?,
            stock: self.stock,
        })
    }
}

/// What a CreateProduct with a request id found.
pub enum Created {
    New(ProductRow),
    /// The same request was made before: its product.
    Replayed(ProductRow),
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

impl ProductStore {
    pub fn new(db: Db) -> Self {
        ProductStore { db }
    }

    pub fn db(&self) -> &Db {
        &self.db
    }

    pub async fn get(&self, id: i64) -> Result<Option<ProductRow>, ApiError> {
        let sql = format!("SELECT {COLUMNS} FROM products WHERE id = ?");
        Ok(on_db!(&self.db, pool => sqlx::query_as(&sql).bind(id).fetch_optional(pool).await)?)
    }

    async fn get_by_request_id(&self, request_id: &str) -> Result<Option<RequestRow>, ApiError> {
        let sql = format!("SELECT {COLUMNS}, request_hash FROM products WHERE request_id = ?");
        Ok(on_db!(&self.db, pool => sqlx::query_as(&sql).bind(request_id).fetch_optional(pool).await)?)
    }

    /// Inserts a product. With a request id, the unique key on it settles
    /// retries, also concurrent ones: exactly one insert wins and the others
    /// read what it wrote.
    pub async fn create(
        &self,
        fields: &ProductFields,
        request: Option<(&str, &[u8])>,
        user_id: Option<i64>,
        now: DateTime<Utc>,
    ) -> Result<Created, ApiError> {
        let (request_id, request_hash) = request.unzip();
        let inserted = on_db!(&self.db, pool => {
            sqlx::query(
                "INSERT INTO products (name, description, price, stock, version, request_id, request_hash, \
                 created_by, updated_by, create_time, update_time) VALUES (?, ?, ?, ?, 1, ?, ?, ?, ?, ?, ?)",
            )
            .bind(&fields.name)
            .bind(&fields.description)
            .bind(fields.price.to_string())
            .bind(fields.stock)
            .bind(request_id)
            .bind(request_hash)
            .bind(user_id)
            .bind(user_id)
            .bind(now)
            .bind(now)
            .execute(pool)
            .await
            .map(|r| r.insert_id())
        });
        match inserted {
            Ok(id) => {
                let row =
                    self.get(id).await?.ok_or_else(|| anyhow::anyhow!("inserted product {id} vanished"))?;
                Ok(Created::New(row))
            }
            Err(e) if is_unique_violation(&e) && request_id.is_some() => {
                let (request_id, request_hash) =
                    (request_id.unwrap_or_default(), request_hash.unwrap_or_default());
                match self.get_by_request_id(request_id).await? {
                    Some(found) if found.request_hash.as_deref() == Some(request_hash) => {
                        Ok(Created::Replayed(found.product))
                    }
                    Some(_) => Ok(Created::Conflict),
                    // Deleted in between: the id is free again.
                    None => Err(ApiError::Aborted("the request raced with a delete; retry it")),
                }
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Up to `limit` products with ids above `after_id`, in id order.
    pub async fn list_after(&self, after_id: i64, limit: i64) -> Result<Vec<ProductRow>, ApiError> {
        let sql = format!("SELECT {COLUMNS} FROM products WHERE id > ? ORDER BY id LIMIT ?");
        Ok(on_db!(&self.db, pool => sqlx::query_as(&sql).bind(after_id).bind(limit).fetch_all(pool).await)?)
    }

    pub async fn count(&self) -> Result<i64, ApiError> {
        Ok(
            on_db!(&self.db, pool => sqlx::query_scalar("SELECT COUNT(*) FROM products").fetch_one(pool).await)?,
        )
    }

    /// Writes `fields` if the product is still at `version` (optimistic
    /// concurrency: of two writers from the same version, one wins).
    pub async fn update_if_version(
        &self,
        id: i64,
        version: i64,
        fields: &ProductFields,
        user_id: Option<i64>,
        now: DateTime<Utc>,
    ) -> Result<Written<ProductRow>, ApiError> {
        let rows = on_db!(&self.db, pool => {
            sqlx::query(
                "UPDATE products SET name = ?, description = ?, price = ?, stock = ?, version = version + 1, \
                 updated_by = ?, update_time = ? WHERE id = ? AND version = ?",
            )
            .bind(&fields.name)
            .bind(&fields.description)
            .bind(fields.price.to_string())
            .bind(fields.stock)
            .bind(user_id)
            .bind(now)
            .bind(id)
            .bind(version)
            .execute(pool)
            .await
            .map(|r| r.rows_affected())
        })?;
        if rows == 1 {
            let row = self.get(id).await?;
            return Ok(row.map_or(Written::NotFound, Written::Done));
        }
        Ok(if self.get(id).await?.is_some() { Written::VersionMismatch } else { Written::NotFound })
    }

    /// Deletes the product, only at `version` when one is given.
    pub async fn delete(&self, id: i64, version: Option<i64>) -> Result<Written<()>, ApiError> {
        let rows = on_db!(&self.db, pool => {
            match version {
                Some(v) => sqlx::query("DELETE FROM products WHERE id = ? AND version = ?").bind(id).bind(v).execute(pool).await,
                None => sqlx::query("DELETE FROM products WHERE id = ?").bind(id).execute(pool).await,
            }
            .map(|r| r.rows_affected())
        })?;
        if rows == 1 {
            return Ok(Written::Done(()));
        }
        Ok(if self.get(id).await?.is_some() { Written::VersionMismatch } else { Written::NotFound })
    }
}
