//! `storegate products …`: the catalogue from the command line.

use storegate::pb::product::v1::{
    AdjustStockRequest, CreateProductRequest, DeleteProductRequest, GetProductRequest, ListProductsRequest,
    Product, UpdateProductRequest,
};

use crate::{
    connect::{Endpoints, authorized},
    output::{Output, product_json, product_line},
    session::Session,
};

#[derive(clap::Subcommand)]
pub enum ProductsCommand {
    /// List products, a page at a time (or --all).
    List {
        #[arg(long, default_value_t = 0)]
        page_size: i32,
        #[arg(long, default_value = "")]
        page_token: String,
        /// id, name, price or create_time, optionally followed by " desc";
        /// or relevance (the default with a query).
        #[arg(long, default_value = "")]
        order_by: String,
        /// Words: only products with every word in their name or
        /// description, the last one as the beginning of a word.
        #[arg(long, default_value = "")]
        query: String,
        /// Follow next_page_token to the end.
        #[arg(long)]
        all: bool,
    },
    /// Show one product.
    Get { id: i64 },
    /// Create a product (needs the admin or catalogue-editor role).
    Create {
        #[arg(long)]
        name: String,
        #[arg(long, default_value = "")]
        description: String,
        /// An exact decimal such as 24.50.
        #[arg(long)]
        price: String,
        #[arg(long, default_value_t = 0)]
        stock: i64,
        /// A UUID that makes retrying this command safe.
        #[arg(long, default_value = "")]
        request_id: String,
    },
    /// Change the given fields of a product (needs the admin or catalogue-editor role).
    Update {
        id: i64,
        #[arg(long)]
        name: Option<String>,
        #[arg(long)]
        description: Option<String>,
        #[arg(long)]
        price: Option<String>,
        #[arg(long)]
        stock: Option<i64>,
        /// Apply only if the product is still at this etag.
        #[arg(long, default_value = "")]
        etag: String,
    },
    /// Delete a product (needs the admin role).
    Delete {
        id: i64,
        #[arg(long, default_value = "")]
        etag: String,
    },
    /// Add to (or, negative, take from) the stock atomically (needs the admin or stock-keeper role).
    AdjustStock {
        id: i64,
        #[arg(allow_hyphen_values = true)]
        delta: i64,
        #[arg(long, default_value = "")]
        request_id: String,
    },
}

fn print_product(out: &Output, product: &Product) {
    out.print(product_json(product), || product_line(product));
}

pub async fn run(endpoints: &Endpoints, out: &Output, command: ProductsCommand) -> anyhow::Result<()> {
    if let Some(client_id) = &endpoints.client_id {
        let session = endpoints.service_session(client_id).await?;
        return run_as(endpoints, out, &command, &session).await;
    }
    let session = endpoints.session().await?;
    match run_as(endpoints, out, &command, &session).await {
        // The token was refused although it looked fresh (revoked key, clock
        // skew): refresh once and retry.
        Err(err)
            if err
                .downcast_ref::<tonic::Status>()
                .is_some_and(|s| s.code() == tonic::Code::Unauthenticated) =>
        {
            let session = endpoints.refresh(session).await?;
            run_as(endpoints, out, &command, &session).await
        }
        other => other,
    }
}

async fn run_as(
    endpoints: &Endpoints,
    out: &Output,
    command: &ProductsCommand,
    session: &Session,
) -> anyhow::Result<()> {
    let mut products = endpoints.products().await?;
    match command {
        ProductsCommand::List { page_size, page_token, order_by, query, all } => {
            let mut request = ListProductsRequest {
                page_size: *page_size,
                page_token: page_token.clone(),
                order_by: order_by.clone(),
                query: query.clone(),
            };
            let mut listed = Vec::new();
            loop {
                let page = products.list_products(authorized(request.clone(), session)?).await?.into_inner();
                listed.extend(page.products);
                if !*all || page.next_page_token.is_empty() {
                    let json = serde_json::json!({
                        "products": listed.iter().map(product_json).collect::<Vec<_>>(),
                        "next_page_token": page.next_page_token,
                        "total_size": page.total_size,
                    });
                    out.print(json, || {
                        let mut text: Vec<String> = listed.iter().map(product_line).collect();
                        text.push(format!("({} of {} products)", listed.len(), page.total_size));
                        if !page.next_page_token.is_empty() {
                            text.push(format!("more: --page-token {}", page.next_page_token));
                        }
                        text.join("\n")
                    });
                    return Ok(());
                }
                request.page_token = page.next_page_token;
            }
        }
        ProductsCommand::Get { id } => {
            let product =
                products.get_product(authorized(GetProductRequest { id: *id }, session)?).await?.into_inner();
            print_product(out, &product);
        }
        ProductsCommand::Create { name, description, price, stock, request_id } => {
            let product = Product {
                name: name.clone(),
                description: description.clone(),
                price: price.clone(),
                stock: *stock,
                ..Default::default()
            };
            let request = CreateProductRequest { product: Some(product), request_id: request_id.clone() };
            print_product(out, &products.create_product(authorized(request, session)?).await?.into_inner());
        }
        ProductsCommand::Update { id, name, description, price, stock, etag } => {
            let mut paths = Vec::new();
            let mut product = Product { id: *id, etag: etag.clone(), ..Default::default() };
            if let Some(name) = name {
                product.name = name.clone();
                paths.push("name".to_owned());
            }
            if let Some(description) = description {
                product.description = description.clone();
                paths.push("description".to_owned());
            }
            if let Some(price) = price {
                product.price = price.clone();
                paths.push("price".to_owned());
            }
            if let Some(stock) = stock {
                product.stock = *stock;
                paths.push("stock".to_owned());
            }
            anyhow::ensure!(
                !paths.is_empty(),
                "name at least one of --name, --description, --price, --stock"
            );
            let request = UpdateProductRequest {
                product: Some(product),
                update_mask: Some(prost_types::FieldMask { paths }),
            };
            print_product(out, &products.update_product(authorized(request, session)?).await?.into_inner());
        }
        ProductsCommand::Delete { id, etag } => {
            products
                .delete_product(authorized(DeleteProductRequest { id: *id, etag: etag.clone() }, session)?)
                .await?;
            out.print(serde_json::json!({ "deleted": id }), || format!("deleted product {id}"));
        }
        ProductsCommand::AdjustStock { id, delta, request_id } => {
            let request = AdjustStockRequest { id: *id, delta: *delta, request_id: request_id.clone() };
            print_product(out, &products.adjust_stock(authorized(request, session)?).await?.into_inner());
        }
    }
    Ok(())
}
