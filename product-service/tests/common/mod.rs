//! The catalogue as its admin sees it, for the test binaries of this
//! folder (each uses its own part of it).
#![allow(dead_code)]

use storegate::pb::product::v1::{
    AdjustStockRequest, CreateProductRequest, GetProductRequest, ListProductsRequest, Product,
};
use storegate_testkit::{Backend, TestStack, bearer};

pub struct Shop {
    pub stack: TestStack,
    pub token: String,
}

/// A product to create: its description is "About <name>".
pub fn product(name: &str, price: &str, stock: i64) -> Product {
    Product {
        name: name.into(),
        description: format!("About {name}"),
        price: price.into(),
        stock,
        ..Default::default()
    }
}

impl Shop {
    pub async fn open(backend: Backend) -> Shop {
        let stack = TestStack::start(backend).await;
        let token = stack.admin_token("shopkeeper").await;
        Shop { stack, token }
    }

    pub async fn add(&self, name: &str, price: &str, stock: i64) -> Product {
        self.create_with_id(product(name, price, stock), "").await.expect("create")
    }

    pub async fn create_with_id(&self, p: Product, request_id: &str) -> Result<Product, tonic::Status> {
        let request = CreateProductRequest { product: Some(p), request_id: request_id.into() };
        self.stack.products().await.create_product(bearer(request, &self.token)).await.map(|r| r.into_inner())
    }

    pub async fn adjust(&self, id: i64, delta: i64, request_id: &str) -> Result<Product, tonic::Status> {
        let request = AdjustStockRequest { id, delta, request_id: request_id.into() };
        self.stack.products().await.adjust_stock(bearer(request, &self.token)).await.map(|r| r.into_inner())
    }

    pub async fn get(&self, id: i64) -> Product {
        self.stack
            .products()
            .await
            .get_product(bearer(GetProductRequest { id }, &self.token))
            .await
            .unwrap()
            .into_inner()
    }

    pub async fn list(
        &self,
        request: ListProductsRequest,
    ) -> Result<(Vec<Product>, String, i64), tonic::Status> {
        let response =
            self.stack.products().await.list_products(bearer(request, &self.token)).await?.into_inner();
        Ok((response.products, response.next_page_token, response.total_size))
    }

    /// Every product of a listing, page by page.
    pub async fn list_all(&self, order_by: &str, query: &str, page_size: i32) -> Vec<Product> {
        let mut all = Vec::new();
        let mut page_token = String::new();
        loop {
            let request = ListProductsRequest {
                page_size,
                page_token: page_token.clone(),
                order_by: order_by.into(),
                query: query.into(),
            };
            let (products, next, _) = self.list(request).await.unwrap();
            all.extend(products);
            if next.is_empty() {
                return all;
            }
            page_token = next;
        }
    }
}

/// The first page of a search for `word` on `store` once it has `expected`
/// rows: at once on SQLite; on MariaDB within 2 s of a bulk import, whose
/// documents InnoDB adds to its full-text cache as the commit finishes, so
/// that another connection's search can miss them for a moment (seen: under
/// 100 ms, with other tests writing; README "Bulk import").
pub async fn search_when_indexed(
    store: &product_service::store::ProductStore,
    backend: &Backend,
    word: &str,
    expected: usize,
) -> product_service::store::Page {
    use product_service::{
        domain::{OrderBy, SortField},
        store::ListQuery,
    };
    let order = OrderBy { field: SortField::Id, descending: false };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
    loop {
        let page =
            store.list(&ListQuery { order, query: Some(word), after: None, limit: 1000 }).await.unwrap();
        let waiting = matches!(backend, Backend::MySql(_)) && std::time::Instant::now() < deadline;
        if page.rows.len() == expected || !waiting {
            return page;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}
