//! The ProductService gRPC API: authorise → validate → store → map.

use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};
use chrono::{DateTime, Utc};
use sha2::{Digest as _, Sha256};
use storegate::{
    ApiError,
    error::FieldViolation,
    pb::product::v1::{
        CreateProductRequest, DeleteProductRequest, GetProductRequest, ListProductsRequest,
        ListProductsResponse, Product, UpdateProductRequest, product_service_server::ProductService,
    },
    token::{ADMIN_ROLE, Claims},
};
use tonic::{Request, Response, Status};

use crate::{
    domain::{Price, check_description, check_name, check_request_id, check_stock, etag, parse_etag},
    store::{Created, ProductFields, ProductRow, ProductStore, Written},
};

pub const DEFAULT_PAGE_SIZE: i32 = 50;
pub const MAX_PAGE_SIZE: i32 = 1000;
/// Paths UpdateProduct may change.
const UPDATABLE: [&str; 4] = ["name", "description", "price", "stock"];
/// Paths that exist but only the server sets.
const OUTPUT_ONLY: [&str; 4] = ["id", "etag", "create_time", "update_time"];
/// Optimistic updates without an etag retry this often on a concurrent write.
const UPDATE_ATTEMPTS: usize = 5;

pub struct ProductApi {
    store: ProductStore,
}

impl ProductApi {
    pub fn new(store: ProductStore) -> Self {
        ProductApi { store }
    }
}

fn timestamp(t: DateTime<Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp { seconds: t.timestamp(), nanos: t.timestamp_subsec_nanos() as i32 }
}

impl From<ProductRow> for Product {
    fn from(row: ProductRow) -> Self {
        Product {
            id: row.id,
            name: row.name,
            description: row.description,
            price: row.price,
            stock: row.stock,
            etag: etag(row.version),
            create_time: Some(timestamp(row.create_time)),
            update_time: Some(timestamp(row.update_time)),
        }
    }
}

fn claims<T>(request: &Request<T>) -> Result<&Claims, ApiError> {
    // The interceptor puts them there; their absence means it did not run.
    request.extensions().get::<Claims>().ok_or(ApiError::Unauthenticated("access token is missing"))
}

fn require_admin<T>(request: &Request<T>) -> Result<Option<i64>, ApiError> {
    let claims = claims(request)?;
    if !claims.has_role(ADMIN_ROLE) {
        return Err(ApiError::PermissionDenied("changing the catalogue needs the admin role"));
    }
    Ok(claims.user_id())
}

/// Validates every client field at once, reporting all violations.
fn validated_fields(product: &Product, prefix: &str) -> Result<ProductFields, ApiError> {
    let field = |name: &str| format!("{prefix}{name}");
    let price = Price::parse(&product.price);
    let violations: Vec<FieldViolation> = [
        check_name(&product.name, &field("name")),
        check_description(&product.description, &field("description")),
        price.err().map(|why| FieldViolation::new(field("price"), why)),
        check_stock(product.stock, &field("stock")),
    ]
    .into_iter()
    .flatten()
    .collect();
    ApiError::check(violations)?;
    Ok(ProductFields {
        name: product.name.clone(),
        description: product.description.clone(),
        price: price.map_err(|why| ApiError::invalid(field("price"), why))?,
        stock: product.stock,
    })
}

/// A page token: where the next page starts. Opaque to clients.
fn encode_page_token(after_id: i64) -> String {
    URL_SAFE_NO_PAD.encode(format!("after:{after_id}"))
}

fn decode_page_token(token: &str) -> Result<i64, ApiError> {
    let invalid = || ApiError::invalid("page_token", "is not a token from a previous ListProducts response");
    let bytes = URL_SAFE_NO_PAD.decode(token).map_err(|_| invalid())?;
    let text = std::str::from_utf8(&bytes).map_err(|_| invalid())?;
    text.strip_prefix("after:").and_then(|id| id.parse().ok()).filter(|id: &i64| *id >= 0).ok_or_else(invalid)
}

/// What identifies a CreateProduct request body, to tell a retry from a
/// different request that reuses the id.
fn request_hash(fields: &ProductFields) -> Vec<u8> {
    let mut hash = Sha256::new();
    for part in [
        fields.name.as_str(),
        fields.description.as_str(),
        &fields.price.to_string(),
        &fields.stock.to_string(),
    ] {
        hash.update((part.len() as u64).to_be_bytes());
        hash.update(part.as_bytes());
    }
    hash.finalize().to_vec()
}

/// The fields UpdateProduct changes: the mask's paths, or without a mask
/// the fields the client set (non-empty strings, non-zero stock).
fn paths_to_update(req: &UpdateProductRequest, product: &Product) -> Result<Vec<&'static str>, ApiError> {
    let Some(mask) = req.update_mask.as_ref().filter(|m| !m.paths.is_empty()) else {
        let set = [
            ("name", !product.name.is_empty()),
            ("description", !product.description.is_empty()),
            ("price", !product.price.is_empty()),
            ("stock", product.stock != 0),
        ];
        let paths: Vec<_> = set.into_iter().filter(|(_, is_set)| *is_set).map(|(p, _)| p).collect();
        if paths.is_empty() {
            return Err(ApiError::invalid("update_mask", "names no field, and no field is set"));
        }
        return Ok(paths);
    };
    let mut paths = Vec::new();
    let mut violations = Vec::new();
    for path in &mask.paths {
        let path = path.strip_prefix("product.").unwrap_or(path);
        if let Some(known) = UPDATABLE.iter().find(|p| **p == path) {
            if !paths.contains(known) {
                paths.push(*known);
            }
        } else if OUTPUT_ONLY.contains(&path) {
            violations.push(FieldViolation::new(
                "update_mask",
                format!("{path} is set by the server and cannot be changed"),
            ));
        } else {
            violations.push(FieldViolation::new("update_mask", format!("{path} is not a product field")));
        }
    }
    ApiError::check(violations)?;
    Ok(paths)
}

/// Validates only the fields being changed.
fn validated_changes(product: &Product, paths: &[&str]) -> Result<(), ApiError> {
    let violations: Vec<FieldViolation> = paths
        .iter()
        .filter_map(|path| match *path {
            "name" => check_name(&product.name, "product.name"),
            "description" => check_description(&product.description, "product.description"),
            "price" => {
                Price::parse(&product.price).err().map(|why| FieldViolation::new("product.price", why))
            }
            "stock" => check_stock(product.stock, "product.stock"),
            _ => None,
        })
        .collect();
    ApiError::check(violations)
}

fn apply(current: &ProductFields, product: &Product, paths: &[&str]) -> Result<ProductFields, ApiError> {
    let mut next = current.clone();
    for path in paths {
        match *path {
            "name" => next.name = product.name.clone(),
            "description" => next.description = product.description.clone(),
            "price" => {
                next.price =
                    Price::parse(&product.price).map_err(|why| ApiError::invalid("product.price", why))?
            }
            "stock" => next.stock = product.stock,
            _ => {}
        }
    }
    Ok(next)
}

fn not_found(id: i64) -> ApiError {
    ApiError::NotFound(format!("product {id} does not exist"))
}

const STALE_ETAG: &str = "the product has changed since that etag; read it again and retry";

impl ProductApi {
    async fn create(&self, request: Request<CreateProductRequest>) -> Result<Product, ApiError> {
        let user_id = require_admin(&request)?;
        let req = request.into_inner();
        let product = req.product.ok_or_else(|| ApiError::invalid("product", "is required"))?;
        let fields = validated_fields(&product, "product.")?;
        let request_id = (!req.request_id.is_empty()).then_some(req.request_id.as_str());
        if let Some(v) = request_id.and_then(check_request_id) {
            return Err(ApiError::InvalidArgument(vec![v]));
        }
        let hash = request_hash(&fields);
        match self
            .store
            .create(&fields, request_id.map(|id| (id, hash.as_slice())), user_id, storegate::db::now())
            .await?
        {
            Created::New(row) => {
                tracing::info!(product_id = row.id, "product created");
                Ok(row.into())
            }
            Created::Replayed(row) => Ok(row.into()),
            Created::Conflict => {
                Err(ApiError::invalid("request_id", "was already used for a different request"))
            }
        }
    }

    async fn get(&self, request: Request<GetProductRequest>) -> Result<Product, ApiError> {
        claims(&request)?;
        let id = request.into_inner().id;
        Ok(self.store.get(id).await?.ok_or_else(|| not_found(id))?.into())
    }

    async fn list(&self, request: Request<ListProductsRequest>) -> Result<ListProductsResponse, ApiError> {
        claims(&request)?;
        let req = request.into_inner();
        let page_size = match req.page_size {
            n if n < 0 => return Err(ApiError::invalid("page_size", "must not be negative")),
            0 => DEFAULT_PAGE_SIZE,
            n => n.min(MAX_PAGE_SIZE),
        };
        let after_id = if req.page_token.is_empty() { 0 } else { decode_page_token(&req.page_token)? };
        // One extra row tells whether another page follows.
        let mut rows = self.store.list_after(after_id, i64::from(page_size) + 1).await?;
        let more = rows.len() > page_size as usize;
        rows.truncate(page_size as usize);
        let next_page_token = match rows.last() {
            Some(last) if more => encode_page_token(last.id),
            _ => String::new(),
        };
        Ok(ListProductsResponse {
            products: rows.into_iter().map(Product::from).collect(),
            next_page_token,
            total_size: self.store.count().await?,
        })
    }

    async fn update(&self, request: Request<UpdateProductRequest>) -> Result<Product, ApiError> {
        let user_id = require_admin(&request)?;
        let req = request.into_inner();
        let product = req.product.as_ref().ok_or_else(|| ApiError::invalid("product", "is required"))?;
        let paths = paths_to_update(&req, product)?;
        validated_changes(product, &paths)?;
        let expected_version = match product.etag.as_str() {
            "" => None,
            tag => Some(parse_etag(tag).ok_or(ApiError::Aborted(STALE_ETAG))?),
        };

        for _ in 0..UPDATE_ATTEMPTS {
            let current = self.store.get(product.id).await?.ok_or_else(|| not_found(product.id))?;
            if expected_version.is_some_and(|v| v != current.version) {
                return Err(ApiError::Aborted(STALE_ETAG));
            }
            let next = apply(&current.fields()?, product, &paths)?;
            match self
                .store
                .update_if_version(product.id, current.version, &next, user_id, storegate::db::now())
                .await?
            {
                Written::Done(row) => return Ok(row.into()),
                Written::NotFound => return Err(not_found(product.id)),
                // Someone wrote in between: with an etag the client loses,
                // without one we re-read and apply the change again.
                Written::VersionMismatch if expected_version.is_some() => {
                    return Err(ApiError::Aborted(STALE_ETAG));
                }
                Written::VersionMismatch => continue,
            }
        }
        Err(ApiError::Aborted("the product is changing too often; retry"))
    }

    async fn delete(&self, request: Request<DeleteProductRequest>) -> Result<(), ApiError> {
        require_admin(&request)?;
        let req = request.into_inner();
        let version = match req.etag.as_str() {
            "" => None,
            tag => Some(parse_etag(tag).ok_or(ApiError::Aborted(STALE_ETAG))?),
        };
        match self.store.delete(req.id, version).await? {
            Written::Done(()) => {
                tracing::info!(product_id = req.id, "product deleted");
                Ok(())
            }
            Written::NotFound => Err(not_found(req.id)),
            Written::VersionMismatch => Err(ApiError::Aborted(STALE_ETAG)),
        }
    }
}

#[tonic::async_trait]
impl ProductService for ProductApi {
    #[tracing::instrument(name = "CreateProduct", skip_all)]
    async fn create_product(
        &self,
        request: Request<CreateProductRequest>,
    ) -> Result<Response<Product>, Status> {
        Ok(Response::new(self.create(request).await?))
    }

    #[tracing::instrument(name = "GetProduct", skip_all)]
    async fn get_product(&self, request: Request<GetProductRequest>) -> Result<Response<Product>, Status> {
        Ok(Response::new(self.get(request).await?))
    }

    #[tracing::instrument(name = "ListProducts", skip_all)]
    async fn list_products(
        &self,
        request: Request<ListProductsRequest>,
    ) -> Result<Response<ListProductsResponse>, Status> {
        Ok(Response::new(self.list(request).await?))
    }

    #[tracing::instrument(name = "UpdateProduct", skip_all)]
    async fn update_product(
        &self,
        request: Request<UpdateProductRequest>,
    ) -> Result<Response<Product>, Status> {
        Ok(Response::new(self.update(request).await?))
    }

    #[tracing::instrument(name = "DeleteProduct", skip_all)]
    async fn delete_product(&self, request: Request<DeleteProductRequest>) -> Result<Response<()>, Status> {
        self.delete(request).await?;
        Ok(Response::new(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_tokens_round_trip_and_garbage_is_refused() {
        assert_eq!(decode_page_token(&encode_page_token(42)).unwrap(), 42);
        for bad in ["x", "!!!", &URL_SAFE_NO_PAD.encode("after:-1"), &URL_SAFE_NO_PAD.encode("before:3")] {
            assert!(decode_page_token(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn request_hashes_tell_different_bodies_apart() {
        let a = ProductFields {
            name: "ab".into(),
            description: "c".into(),
            price: Price::parse("1").unwrap(),
            stock: 1,
        };
        let b = ProductFields { name: "a".into(), description: "bc".into(), ..a.clone() };
        assert_eq!(request_hash(&a), request_hash(&a.clone()));
        assert_ne!(request_hash(&a), request_hash(&b));
    }
}
