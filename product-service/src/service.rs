//! The ProductService gRPC API: authorise → validate → store → map.

use std::sync::Arc;

use sha2::{Digest as _, Sha256};
use storegate::{
    ApiError,
    error::FieldViolation,
    pb::product::v1::{
        AdjustStockRequest, CreateProductRequest, DeleteProductRequest, GetProductRequest,
        ListProductsRequest, ListProductsResponse, Product, UpdateProductRequest,
        product_service_server::ProductService,
    },
    token::{ADMIN_ROLE, CATALOGUE_EDITOR_ROLE, Claims, STOCK_KEEPER_ROLE},
};
use tonic::{Request, Response, Status};

use crate::{
    domain::{
        MAX_STOCK, OrderBy, Price, SortField, check_description, check_name, check_query, check_stock,
        parse_etag, parse_request_id,
    },
    page_token::{self, Cursor},
    search_limit::SearchLimit,
    store::{
        Adjusted, FieldChanges, Idempotent, ListQuery, ProductFields, ProductStore, RequestKey, Written,
    },
};

pub const DEFAULT_PAGE_SIZE: i32 = 50;
pub const MAX_PAGE_SIZE: i32 = 1000;
/// Paths UpdateProduct may change.
const UPDATABLE: [&str; 4] = ["name", "description", "price", "stock"];
/// Paths that exist but only the server sets.
const OUTPUT_ONLY: [&str; 6] = ["id", "etag", "create_time", "update_time", "created_by", "updated_by"];

pub struct ProductApi {
    store: ProductStore,
    /// Bounds the `query` listings (full-text searches) running at once.
    search_limit: Arc<SearchLimit>,
}

impl ProductApi {
    pub fn new(store: ProductStore, search_limit: Arc<SearchLimit>) -> Self {
        ProductApi { store, search_limit }
    }
}

fn claims<T>(request: &Request<T>) -> Result<&Claims, ApiError> {
    // The interceptor puts them there; their absence means it did not run.
    request.extensions().get::<Claims>().ok_or(ApiError::Unauthenticated("access token is missing"))
}

/// A change to the catalogue, and the roles that allow it: least privilege
/// for the services that call product-service (README, "Roles"). Reads need
/// only a valid token, whatever its roles.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Change {
    Create,
    Update,
    Delete,
    AdjustStock,
}

impl Change {
    /// The roles any one of which allows this change.
    pub fn allowed_roles(self) -> &'static [&'static str] {
        match self {
            Change::Create | Change::Update => &[ADMIN_ROLE, CATALOGUE_EDITOR_ROLE],
            Change::Delete => &[ADMIN_ROLE],
            Change::AdjustStock => &[ADMIN_ROLE, STOCK_KEEPER_ROLE],
        }
    }

    fn refusal(self) -> &'static str {
        match self {
            Change::Create => "creating a product needs the admin or catalogue-editor role",
            Change::Update => "updating a product needs the admin or catalogue-editor role",
            Change::Delete => "deleting a product needs the admin role",
            Change::AdjustStock => "adjusting stock needs the admin or stock-keeper role",
        }
    }
}

/// The caller's user id (None for a subject that is no user) once its
/// token holds a role that allows `change`; PERMISSION_DENIED otherwise.
fn require_role<T>(request: &Request<T>, change: Change) -> Result<Option<i64>, ApiError> {
    let claims = claims(request)?;
    if !change.allowed_roles().iter().any(|role| claims.has_role(role)) {
        return Err(ApiError::PermissionDenied(change.refusal()));
    }
    Ok(claims.user_id())
}

/// Who is calling, as request ids are scoped: the token's `sub`.
/// auth-service writes user ids there; anything empty or longer than the
/// column (64) is not a subject it issued.
fn caller<T>(request: &Request<T>) -> Result<String, ApiError> {
    let sub = &claims(request)?.sub;
    if sub.is_empty() || sub.len() > 64 {
        return Err(ApiError::Unauthenticated("the access token names no valid subject"));
    }
    Ok(sub.clone())
}

/// Validates every client field at once, reporting all violations.
pub(crate) fn validated_fields(product: &Product, prefix: &str) -> Result<ProductFields, ApiError> {
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

/// The idempotency key of a write: the caller and their request id, with a
/// hash of the method and body that tells a retry from another request
/// reusing it.
fn request_key(
    caller: String,
    request_id: &str,
    method: &str,
    body: &[&str],
) -> Result<Option<RequestKey>, ApiError> {
    let Some(id) = parse_request_id(request_id).map_err(|v| ApiError::InvalidArgument(vec![v]))? else {
        return Ok(None);
    };
    let mut hash = Sha256::new_with_prefix(method);
    for part in body {
        hash.update((part.len() as u64).to_be_bytes());
        hash.update(part.as_bytes());
    }
    Ok(Some(RequestKey { caller, id, hash: hash.finalize().to_vec() }))
}

fn create_request_key(
    caller: String,
    request_id: &str,
    fields: &ProductFields,
) -> Result<Option<RequestKey>, ApiError> {
    let (price, stock) = (fields.price.to_string(), fields.stock.to_string());
    request_key(caller, request_id, "CreateProduct", &[&fields.name, &fields.description, &price, &stock])
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

/// The fields of `product` that `paths` name, as an update's changes.
fn changes(product: &Product, paths: &[&str]) -> Result<FieldChanges, ApiError> {
    let mut changes = FieldChanges::default();
    for path in paths {
        match *path {
            "name" => changes.name = Some(product.name.clone()),
            "description" => changes.description = Some(product.description.clone()),
            "price" => {
                changes.price = Some(
                    Price::parse(&product.price).map_err(|why| ApiError::invalid("product.price", why))?,
                )
            }
            "stock" => changes.stock = Some(product.stock),
            _ => {}
        }
    }
    Ok(changes)
}

fn not_found(id: i64) -> ApiError {
    ApiError::NotFound(format!("product {id} does not exist"))
}

fn request_id_reused() -> ApiError {
    ApiError::invalid("request_id", "was already used for a different request")
}

const STALE_ETAG: &str = "the product has changed since that etag; read it again and retry";

impl ProductApi {
    async fn create(&self, request: Request<CreateProductRequest>) -> Result<Product, ApiError> {
        let user_id = require_role(&request, Change::Create)?;
        let caller = caller(&request)?;
        let req = request.into_inner();
        let product = req.product.ok_or_else(|| ApiError::invalid("product", "is required"))?;
        let fields = validated_fields(&product, "product.")?;
        let key = create_request_key(caller, &req.request_id, &fields)?;
        match self.store.create(&fields, key.as_ref(), user_id, storegate::db::now()).await? {
            Idempotent::Fresh(product) => {
                tracing::info!(product_id = product.id, "product created");
                Ok(product)
            }
            Idempotent::Replayed(product) => Ok(product),
            Idempotent::Conflict => Err(request_id_reused()),
        }
    }

    async fn adjust_stock(&self, request: Request<AdjustStockRequest>) -> Result<Product, ApiError> {
        let user_id = require_role(&request, Change::AdjustStock)?;
        let caller = caller(&request)?;
        let req = request.into_inner();
        if req.delta == 0 || req.delta.unsigned_abs() > MAX_STOCK as u64 {
            return Err(ApiError::invalid("delta", "must be non-zero and at most 10^15 either way"));
        }
        let body = [req.id.to_string(), req.delta.to_string()];
        let key = request_key(caller, &req.request_id, "AdjustStock", &[&body[0], &body[1]])?;
        match self.store.adjust_stock(req.id, req.delta, key.as_ref(), user_id, storegate::db::now()).await? {
            Idempotent::Fresh(Adjusted::Done(product)) => Ok(product),
            Idempotent::Fresh(Adjusted::NotFound) => Err(not_found(req.id)),
            Idempotent::Fresh(Adjusted::OutOfRange) => Err(ApiError::FailedPrecondition(format!(
                "adjusting the stock of product {} by {} would take it below 0 (or above 10^15); nothing changed",
                req.id, req.delta
            ))),
            Idempotent::Replayed(product) => Ok(product),
            Idempotent::Conflict => Err(request_id_reused()),
        }
    }

    async fn get(&self, request: Request<GetProductRequest>) -> Result<Product, ApiError> {
        claims(&request)?;
        let id = request.into_inner().id;
        self.store.get(id).await?.ok_or_else(|| not_found(id))?.into_product()
    }

    async fn list(&self, request: Request<ListProductsRequest>) -> Result<ListProductsResponse, ApiError> {
        claims(&request)?;
        let searcher = (!request.get_ref().query.is_empty()).then(|| caller(&request)).transpose()?;
        let req = request.into_inner();
        let order = OrderBy::parse(&req.order_by);
        let violations: Vec<FieldViolation> = [
            (req.page_size < 0).then(|| FieldViolation::new("page_size", "must not be negative")),
            order.clone().err(),
            check_query(&req.query),
        ]
        .into_iter()
        .flatten()
        .collect();
        ApiError::check(violations)?;
        let mut order = order.map_err(|v| ApiError::InvalidArgument(vec![v]))?;
        if order.field == SortField::Relevance && req.query.is_empty() {
            return Err(ApiError::invalid("order_by", "relevance needs a query"));
        }
        // A search is ordered best match first unless asked otherwise.
        if req.order_by.trim().is_empty() && !req.query.is_empty() {
            order = OrderBy { field: SortField::Relevance, descending: false };
        }
        // A search holds its place until its answer is built: it reads the
        // full-text index, and its matches can still be many.
        let _search = match searcher {
            Some(caller) => Some(self.search_limit.start(&caller).await?),
            None => None,
        };
        let page_size = match req.page_size {
            0 => DEFAULT_PAGE_SIZE,
            n => n.min(MAX_PAGE_SIZE),
        };
        let after = match req.page_token.as_str() {
            "" => None,
            token => Some(page_token::decode(token, order, &req.query)?),
        };
        let query = (!req.query.is_empty()).then_some(req.query.as_str());
        // One extra row tells whether another page follows.
        let listing = ListQuery { order, query, after: after.as_ref(), limit: i64::from(page_size) + 1 };
        let crate::store::Page { mut rows, scores, cursors, total_size, resume, .. } =
            self.store.list(&listing).await?;
        let more = rows.len() > page_size as usize;
        rows.truncate(page_size as usize);
        let products = rows.into_iter().map(|row| row.into_product()).collect::<Result<Vec<_>, _>>()?;
        let next_page_token = match (products.last(), resume) {
            (Some(last), _) if more => {
                let cursor = match (cursors.into_iter().nth(products.len() - 1), order.field) {
                    (Some(cursor), _) => cursor,
                    (None, SortField::Relevance) => {
                        let score = scores.get(products.len() - 1).copied().unwrap_or_default();
                        Cursor::after_match(last, score)
                    }
                    (None, _) => Cursor::after(last, order)?,
                };
                page_token::encode(&cursor, order, &req.query)
            }
            // A short page of a search that stopped at its bound on rows read.
            (_, Some(resume)) => page_token::encode(&resume, order, &req.query),
            _ => String::new(),
        };
        Ok(ListProductsResponse { products, next_page_token, total_size })
    }

    async fn update(&self, request: Request<UpdateProductRequest>) -> Result<Product, ApiError> {
        let user_id = require_role(&request, Change::Update)?;
        let req = request.into_inner();
        let product = req.product.as_ref().ok_or_else(|| ApiError::invalid("product", "is required"))?;
        let paths = paths_to_update(&req, product)?;
        validated_changes(product, &paths)?;
        let expected_version = match product.etag.as_str() {
            "" => None,
            tag => Some(parse_etag(tag).ok_or(ApiError::Aborted(STALE_ETAG))?),
        };

        let changes = changes(product, &paths)?;
        match self.store.update(product.id, &changes, expected_version, user_id, storegate::db::now()).await?
        {
            Written::Done(row) => row.into_product(),
            Written::NotFound => Err(not_found(product.id)),
            Written::VersionMismatch => Err(ApiError::Aborted(STALE_ETAG)),
        }
    }

    async fn delete(&self, request: Request<DeleteProductRequest>) -> Result<(), ApiError> {
        require_role(&request, Change::Delete)?;
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

    #[tracing::instrument(name = "AdjustStock", skip_all)]
    async fn adjust_stock(&self, request: Request<AdjustStockRequest>) -> Result<Response<Product>, Status> {
        Ok(Response::new(ProductApi::adjust_stock(self, request).await?))
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
    fn request_keys_tell_retries_from_reuse() {
        let fields = |name: &str, description: &str| ProductFields {
            name: name.into(),
            description: description.into(),
            price: Price::parse("1").unwrap(),
            stock: 1,
        };
        let id = "6f1c2d4e-8a8b-4c1e-9d3f-2b7a5e0c9f11";
        let key = |id: &str, fields: &ProductFields| create_request_key("7".into(), id, fields);
        let a = key(id, &fields("ab", "c")).unwrap().unwrap();
        let again = key(&id.to_uppercase(), &fields("ab", "c")).unwrap().unwrap();
        let b = key(id, &fields("a", "bc")).unwrap().unwrap();
        assert_eq!((a.id.as_str(), &a.hash), (again.id.as_str(), &again.hash));
        assert_ne!(a.hash, b.hash);
        let adjust = request_key("7".into(), id, "AdjustStock", &["ab", "c"]).unwrap().unwrap();
        assert_ne!(a.hash, adjust.hash, "the method is part of the request");
        assert_eq!(a.caller, "7", "the key is the caller's");
        assert!(key("", &fields("a", "b")).unwrap().is_none());
        assert!(key("not-a-uuid", &fields("a", "b")).is_err());
    }
}
