//! The token source a backend service's generated stubs use: one fetch for
//! 64 concurrent calls, the next fetched before the token ends, the token
//! on every call through a tonic client, and a clear UNAVAILABLE (never the
//! secret) when the credentials are refused. Real servers, SQLite and
//! MySQL.

use std::time::Duration;

use auth_service::service_accounts::{Output, commands};
use storegate::{
    pb::product::v1::{
        AdjustStockRequest, CreateProductRequest, GetProductRequest,
        product_service_client::ProductServiceClient,
    },
    token_source::{ClientCredentials, TokenSource},
};
use storegate_testkit::{Backend, TestStack, backend_tests};
use tonic::Code;
use tower_layer::Layer as _;

backend_tests!(
    concurrent_calls_share_one_fetch_and_the_token_is_renewed_before_it_ends,
    refused_credentials_fail_calls_as_unavailable_without_the_secret,
);

fn source(stack: &TestStack, client_id: &str, secret: &str, margin: Duration) -> TokenSource {
    let credentials = ClientCredentials {
        token_url: format!("http://{}/oauth2/token", stack.auth_addr),
        client_id: client_id.to_owned(),
        client_secret: secret.to_owned().into(),
        scope: None,
    };
    TokenSource::with_margin(credentials, &Default::default(), margin).unwrap()
}

async fn concurrent_calls_share_one_fetch_and_the_token_is_renewed_before_it_ends(backend: Backend) {
    let stack = TestStack::start(backend).await;
    let config = TestStack::auth_config(&stack.db);
    let svc =
        commands::create(&config, "warehouse", &["stock-keeper".to_owned()], Output::Json).await.unwrap();
    let admin = stack.admin_token("root").await;
    let kettle = stack.create_product(&admin, "Kettle", "9.99", 100).await;

    // Tokens live 900 s; a margin of 898 s renews each after 2 s.
    let source = source(&stack, &svc.client_id, &svc.client_secret, Duration::from_secs(898));
    let channel = TestStack::channel(stack.product_addr.unwrap()).await;
    let products = ProductServiceClient::new(source.layer().layer(channel));
    let burst = |products: &ProductServiceClient<_>| {
        let calls: Vec<_> = (0..64)
            .map(|_| {
                let mut products = products.clone();
                tokio::spawn(async move { products.get_product(GetProductRequest { id: kettle.id }).await })
            })
            .collect();
        async move {
            for call in calls {
                call.await.unwrap().expect("a call with the source's token");
            }
        }
    };
    burst(&products).await;
    assert_eq!(source.fetches(), 1, "64 concurrent calls, one fetch");
    let first = source.bearer().await.unwrap();
    tokio::time::sleep(Duration::from_millis(2_200)).await;
    burst(&products).await;
    assert_eq!(source.fetches(), 2, "renewed once, before the token ended");
    assert_ne!(source.bearer().await.unwrap(), first, "a new token");

    // The token carries the account's roles: AdjustStock yes, CreateProduct no.
    let mut products = products;
    let adjusted = products
        .adjust_stock(AdjustStockRequest { id: kettle.id, delta: -1, request_id: String::new() })
        .await;
    assert_eq!(adjusted.unwrap().into_inner().stock, 99);
    let denied = products
        .create_product(CreateProductRequest { product: Some(kettle), request_id: String::new() })
        .await;
    assert_eq!(denied.unwrap_err().code(), Code::PermissionDenied);
}

async fn refused_credentials_fail_calls_as_unavailable_without_the_secret(backend: Backend) {
    let stack = TestStack::start(backend).await;
    let config = TestStack::auth_config(&stack.db);
    let svc = commands::create(&config, "stale", &[], Output::Json).await.unwrap();
    let wrong = "a-secret-that-is-not-the-one";
    let source = source(&stack, &svc.client_id, wrong, Duration::from_secs(60));
    let channel = TestStack::channel(stack.product_addr.unwrap()).await;
    let mut products = ProductServiceClient::new(source.layer().layer(channel));
    let err = products.get_product(GetProductRequest { id: 1 }).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(err.message().contains("invalid_client"), "{err:?}");
    assert!(!err.message().contains(wrong) && !err.message().contains(&svc.client_secret));
}
