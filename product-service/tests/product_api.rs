//! ProductService end to end: both real servers on port 0 and a fresh
//! database, on SQLite and MySQL.

use std::collections::HashSet;

use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};
use storegate::{
    Db, on_db,
    pb::{
        auth::v1::CompleteLoginRequest,
        product::v1::{
            AdjustStockRequest, CreateProductRequest, DeleteProductRequest, GetProductRequest,
            ListProductsRequest, Product, UpdateProductRequest,
        },
    },
};
use storegate_testkit::{Backend, TestStack, backend_tests, bearer, totp_code};
use tonic::Code;
use tonic_types::StatusExt as _;

backend_tests!(
    the_seed_flow_from_registration_to_every_product_rpc,
    calls_without_a_valid_token_are_unauthenticated,
    signed_in_users_read_but_only_admins_write,
    each_role_makes_exactly_the_changes_the_role_table_allows,
    bad_product_fields_are_all_reported_and_nothing_is_written,
    missing_products_are_not_found,
    listing_pages_through_every_product_exactly_once,
    updates_change_only_masked_fields_and_respect_etags,
    concurrent_updates_without_an_etag_all_apply,
    create_with_a_request_id_is_idempotent,
    prices_are_stored_as_exact_decimals,
    health_and_reflection_are_served,
);

fn product(name: &str, price: &str, stock: i64) -> Product {
    Product {
        name: name.into(),
        description: format!("{name}, described"),
        price: price.into(),
        stock,
        ..Default::default()
    }
}

fn mask(paths: &[&str]) -> Option<prost_types::FieldMask> {
    Some(prost_types::FieldMask { paths: paths.iter().map(|p| p.to_string()).collect() })
}

async fn count_products(db: &Db) -> i64 {
    on_db!(db, pool => sqlx::query_scalar("SELECT COUNT(*) FROM products").fetch_one(pool).await).unwrap()
}

async fn create(stack: &TestStack, token: &str, p: Product) -> Product {
    stack
        .products()
        .await
        .create_product(bearer(CreateProductRequest { product: Some(p), request_id: String::new() }, token))
        .await
        .expect("create product")
        .into_inner()
}

/// The whole story a newcomer follows in the README.
async fn the_seed_flow_from_registration_to_every_product_rpc(backend: Backend) {
    let stack = TestStack::start(backend).await;
    stack.register("shopkeeper", "correct horse battery").await;
    auth_service::grant_role(&TestStack::auth_config(&stack.db), "shopkeeper", "admin").await.unwrap();

    // Step 1: the password gives a ticket and, on first login, the QR code.
    let begun = stack.begin_login("shopkeeper", "correct horse battery").await;
    let enrollment = begun.enrollment.expect("QR enrollment on first login");
    let image = image::load_from_memory(&enrollment.qr_png).unwrap().to_luma8();
    let (_, uri) = rqrr::PreparedImage::prepare(image).detect_grids()[0].decode().expect("QR decodes");
    assert_eq!(uri, enrollment.otpauth_uri);
    // What an authenticator app does: read the secret out of the URI.
    let secret = uri.split_once("secret=").unwrap().1.split('&').next().unwrap().to_owned();

    // Step 2: the code from the secret gives the tokens.
    let tokens = stack
        .auth()
        .await
        .complete_login(CompleteLoginRequest {
            login_ticket: begun.login_ticket,
            code: totp_code(&secret, 0),
        })
        .await
        .unwrap()
        .into_inner();
    let token = tokens.access_token.as_str();

    let mut products = stack.products().await;
    let created = products
        .create_product(bearer(
            CreateProductRequest { product: Some(product("Teapot", "24.50", 10)), request_id: String::new() },
            token,
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(created.id > 0);
    assert_eq!((created.name.as_str(), created.price.as_str(), created.stock), ("Teapot", "24.50", 10));
    assert!(!created.etag.is_empty());
    assert!(created.create_time.is_some() && created.update_time == created.create_time);

    let got =
        products.get_product(bearer(GetProductRequest { id: created.id }, token)).await.unwrap().into_inner();
    assert_eq!(got, created);

    let listed = products
        .list_products(bearer(
            ListProductsRequest { page_size: 0, page_token: String::new(), ..Default::default() },
            token,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.products, std::slice::from_ref(&created));
    assert_eq!(listed.total_size, 1);
    assert!(listed.next_page_token.is_empty());

    // The seed's "update price and stock only".
    let updated = products
        .update_product(bearer(
            UpdateProductRequest {
                product: Some(Product {
                    id: created.id,
                    name: "ignored".into(),
                    price: "19.99".into(),
                    stock: 7,
                    ..Default::default()
                }),
                update_mask: mask(&["price", "stock"]),
            },
            token,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((updated.name.as_str(), updated.price.as_str(), updated.stock), ("Teapot", "19.99", 7));
    assert_eq!(updated.description, created.description);
    assert_ne!(updated.etag, created.etag);

    products
        .delete_product(bearer(DeleteProductRequest { id: created.id, etag: updated.etag }, token))
        .await
        .unwrap();
    let err = products.get_product(bearer(GetProductRequest { id: created.id }, token)).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert_eq!(count_products(&stack.db.open().await).await, 0);
}

async fn calls_without_a_valid_token_are_unauthenticated(backend: Backend) {
    let stack = TestStack::start(backend).await;
    let token = stack.admin_token("admin").await;
    let mut products = stack.products().await;

    let err = products.get_product(GetProductRequest { id: 1 }).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "no token");

    // A token signed by a key auth-service never published.
    let foreign = {
        use ed25519_dalek::pkcs8::EncodePrivateKey as _;
        let key = ed25519_dalek::SigningKey::generate(&mut rand::rngs::OsRng);
        let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::EdDSA);
        header.typ = Some("at+jwt".into());
        let (real_header, _) = token.split_once('.').unwrap();
        let real: serde_json::Value =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(real_header).unwrap()).unwrap();
        header.kid = real["kid"].as_str().map(str::to_owned);
        let payload: serde_json::Value =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(token.split('.').nth(1).unwrap()).unwrap())
                .unwrap();
        jsonwebtoken::encode(
            &header,
            &payload,
            &jsonwebtoken::EncodingKey::from_ed_der(key.to_pkcs8_der().unwrap().as_bytes()),
        )
        .unwrap()
    };
    let tampered = {
        let parts: Vec<&str> = token.split('.').collect();
        let mut payload: serde_json::Value =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[1]).unwrap()).unwrap();
        payload["sub"] = "999".into();
        format!("{}.{}.{}", parts[0], URL_SAFE_NO_PAD.encode(payload.to_string()), parts[2])
    };
    for (what, bad) in
        [("garbage", "not-a-token"), ("foreign key", foreign.as_str()), ("tampered", tampered.as_str())]
    {
        let err = products.get_product(bearer(GetProductRequest { id: 1 }, bad)).await.unwrap_err();
        assert_eq!(err.code(), Code::Unauthenticated, "{what}");
        assert!(!err.message().contains(bad), "the token is not echoed");
    }

    // The right token without the Bearer scheme.
    let mut request = tonic::Request::new(GetProductRequest { id: 1 });
    request.metadata_mut().insert("authorization", token.parse().unwrap());
    assert_eq!(products.get_product(request).await.unwrap_err().code(), Code::Unauthenticated);

    // A write with a bad token changes nothing.
    let err = products
        .create_product(bearer(
            CreateProductRequest { product: Some(product("X", "1", 1)), request_id: String::new() },
            &tampered,
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    assert_eq!(count_products(&stack.db.open().await).await, 0);

    // And the real token works.
    let err = products.get_product(bearer(GetProductRequest { id: 1 }, &token)).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
}

async fn signed_in_users_read_but_only_admins_write(backend: Backend) {
    let stack = TestStack::start(backend).await;
    let admin = stack.admin_token("admin").await;
    let (user, _) = stack.register_and_login("shopper", "correct horse battery").await;
    let user = user.access_token;
    let teapot = create(&stack, &admin, product("Teapot", "24.50", 10)).await;
    let mut products = stack.products().await;

    let got =
        products.get_product(bearer(GetProductRequest { id: teapot.id }, &user)).await.unwrap().into_inner();
    assert_eq!(got, teapot);
    let listed =
        products.list_products(bearer(ListProductsRequest::default(), &user)).await.unwrap().into_inner();
    assert_eq!(listed.total_size, 1);

    let denied = [
        products
            .create_product(bearer(
                CreateProductRequest { product: Some(product("Cup", "3", 1)), request_id: String::new() },
                &user,
            ))
            .await
            .unwrap_err(),
        products
            .update_product(bearer(
                UpdateProductRequest {
                    product: Some(Product { id: teapot.id, stock: 0, ..Default::default() }),
                    update_mask: mask(&["stock"]),
                },
                &user,
            ))
            .await
            .unwrap_err(),
        products
            .delete_product(bearer(DeleteProductRequest { id: teapot.id, etag: String::new() }, &user))
            .await
            .unwrap_err(),
    ];
    for err in denied {
        assert_eq!(err.code(), Code::PermissionDenied);
    }
    let db = stack.db.open().await;
    assert_eq!(count_products(&db).await, 1);
    let after =
        products.get_product(bearer(GetProductRequest { id: teapot.id }, &user)).await.unwrap().into_inner();
    assert_eq!(after, teapot, "nothing changed");
}

async fn bad_product_fields_are_all_reported_and_nothing_is_written(backend: Backend) {
    let stack = TestStack::start(backend).await;
    let token = stack.admin_token("admin").await;
    let mut products = stack.products().await;

    let bad = Product {
        name: String::new(),
        description: "d".repeat(5001),
        price: "-1.5".into(),
        stock: -3,
        ..Default::default()
    };
    let err = products
        .create_product(bearer(
            CreateProductRequest { product: Some(bad), request_id: String::new() },
            &token,
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let details = err.get_error_details();
    let mut fields: Vec<_> =
        details.bad_request().unwrap().field_violations.iter().map(|v| v.field.clone()).collect();
    fields.sort();
    assert_eq!(fields, ["product.description", "product.name", "product.price", "product.stock"]);

    for price in ["1.234", "abc", "1e5", "10000000000", ""] {
        let err = products
            .create_product(bearer(
                CreateProductRequest { product: Some(product("Cup", price, 1)), request_id: String::new() },
                &token,
            ))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "price {price:?}");
    }
    let err = products
        .create_product(bearer(
            CreateProductRequest {
                product: Some(product(&"n".repeat(201), "1", 1)),
                request_id: String::new(),
            },
            &token,
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "name too long");
    let err = products.create_product(bearer(CreateProductRequest::default(), &token)).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "no product");
    // A message over the request size limit (256 KiB) is refused before
    // any handler runs: too large, not out of range.
    let huge = Product { description: "d".repeat(300 * 1024), ..product("Cup", "1", 1) };
    let err = products
        .create_product(bearer(
            CreateProductRequest { product: Some(huge), request_id: String::new() },
            &token,
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(err.message().contains("larger than this server accepts"), "{}", err.message());
    assert_eq!(count_products(&stack.db.open().await).await, 0);

    // Updates validate the changed fields and change nothing when they fail.
    let cup = create(&stack, &token, product("Cup", "3.00", 5)).await;
    for (p, paths) in [
        (Product { id: cup.id, price: "0.001".into(), ..Default::default() }, vec!["price"]),
        (Product { id: cup.id, stock: -1, ..Default::default() }, vec!["stock"]),
        (Product { id: cup.id, ..Default::default() }, vec!["name"]),
        (Product { id: cup.id, stock: 1, ..Default::default() }, vec!["colour"]),
        (Product { id: cup.id, stock: 1, ..Default::default() }, vec!["id"]),
        (Product { id: cup.id, stock: 1, ..Default::default() }, vec!["create_time"]),
    ] {
        let err = products
            .update_product(bearer(
                UpdateProductRequest { product: Some(p), update_mask: mask(&paths) },
                &token,
            ))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{paths:?}");
    }
    let after =
        products.get_product(bearer(GetProductRequest { id: cup.id }, &token)).await.unwrap().into_inner();
    assert_eq!(after, cup);
}

async fn missing_products_are_not_found(backend: Backend) {
    let stack = TestStack::start(backend).await;
    let token = stack.admin_token("admin").await;
    let mut products = stack.products().await;
    let codes = [
        products.get_product(bearer(GetProductRequest { id: 424242 }, &token)).await.unwrap_err().code(),
        products
            .update_product(bearer(
                UpdateProductRequest {
                    product: Some(Product { id: 424242, stock: 1, ..Default::default() }),
                    update_mask: mask(&["stock"]),
                },
                &token,
            ))
            .await
            .unwrap_err()
            .code(),
        products
            .delete_product(bearer(DeleteProductRequest { id: 424242, etag: String::new() }, &token))
            .await
            .unwrap_err()
            .code(),
    ];
    assert_eq!(codes, [Code::NotFound; 3]);
}

async fn listing_pages_through_every_product_exactly_once(backend: Backend) {
    let stack = TestStack::start(backend).await;
    let token = stack.admin_token("admin").await;
    for i in 0..7 {
        create(&stack, &token, product(&format!("Item {i}"), "1.00", i)).await;
    }
    let mut products = stack.products().await;
    let mut seen = Vec::new();
    let mut page_token = String::new();
    let mut pages = 0;
    loop {
        let page = products
            .list_products(bearer(
                ListProductsRequest { page_size: 3, page_token: page_token.clone(), ..Default::default() },
                &token,
            ))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(page.total_size, 7);
        assert!(page.products.len() <= 3);
        seen.extend(page.products.iter().map(|p| p.id));
        pages += 1;
        if page.next_page_token.is_empty() {
            break;
        }
        page_token = page.next_page_token;
    }
    assert_eq!(pages, 3);
    assert_eq!(seen.len(), 7);
    assert_eq!(seen.iter().collect::<HashSet<_>>().len(), 7, "no product twice");
    assert!(seen.windows(2).all(|w| w[0] < w[1]), "stable id order");

    let all = products
        .list_products(bearer(
            ListProductsRequest { page_size: 5000, page_token: String::new(), ..Default::default() },
            &token,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(all.products.len(), 7, "page sizes above 1000 are capped, not refused");

    for (size, token_text) in [(-1, ""), (3, "not-a-page-token"), (3, "YWZ0ZXI6LTU")] {
        let err = products
            .list_products(bearer(
                ListProductsRequest { page_size: size, page_token: token_text.into(), ..Default::default() },
                &token,
            ))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{size} {token_text}");
    }
}

async fn updates_change_only_masked_fields_and_respect_etags(backend: Backend) {
    let stack = TestStack::start(backend).await;
    let token = stack.admin_token("admin").await;
    let mut products = stack.products().await;
    let original = create(&stack, &token, product("Kettle", "30.00", 4)).await;

    // Without a mask, the fields that are set change.
    let renamed = products
        .update_product(bearer(
            UpdateProductRequest {
                product: Some(Product {
                    id: original.id,
                    name: "Electric kettle".into(),
                    ..Default::default()
                }),
                update_mask: None,
            },
            &token,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(renamed.name, "Electric kettle");
    assert_eq!(
        (renamed.price.as_str(), renamed.stock, renamed.description.as_str()),
        ("30.00", 4, original.description.as_str())
    );

    // A mask can set stock to zero, which "set fields" cannot express.
    let emptied = products
        .update_product(bearer(
            UpdateProductRequest {
                product: Some(Product {
                    id: original.id,
                    stock: 0,
                    etag: renamed.etag.clone(),
                    ..Default::default()
                }),
                update_mask: mask(&["stock"]),
            },
            &token,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((emptied.stock, emptied.name.as_str()), (0, "Electric kettle"));

    // The etag from before that write is stale now.
    let err = products
        .update_product(bearer(
            UpdateProductRequest {
                product: Some(Product {
                    id: original.id,
                    stock: 9,
                    etag: renamed.etag.clone(),
                    ..Default::default()
                }),
                update_mask: mask(&["stock"]),
            },
            &token,
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Aborted);
    let err = products
        .delete_product(bearer(DeleteProductRequest { id: original.id, etag: renamed.etag }, &token))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Aborted);
    let now = products
        .get_product(bearer(GetProductRequest { id: original.id }, &token))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(now, emptied, "stale writes changed nothing");
}

/// Without an etag an update sets its fields in one statement: of many at
/// once, each is answered with its own change (none ABORTED), each field's
/// last writer wins, and every one counts as a version.
async fn concurrent_updates_without_an_etag_all_apply(backend: Backend) {
    const WRITERS: usize = 24;
    let stack = TestStack::start(backend).await;
    let token = stack.admin_token("admin").await;
    let original = create(&stack, &token, product("Kettle", "30.00", 4)).await;
    let mut calls = Vec::new();
    for i in 0..WRITERS {
        let (mut products, token) = (stack.products().await, token.clone());
        // Half rename, half reprice: two fields written at once.
        let (changed, paths) = if i % 2 == 0 {
            (Product { id: original.id, name: format!("Kettle {i}"), ..Default::default() }, vec!["name"])
        } else {
            (Product { id: original.id, price: format!("{i}.00"), ..Default::default() }, vec!["price"])
        };
        calls.push(tokio::spawn(async move {
            let request = UpdateProductRequest { product: Some(changed), update_mask: mask(&paths) };
            products.update_product(bearer(request, &token)).await.map(|r| r.into_inner())
        }));
    }
    let (mut names, mut prices) = (HashSet::new(), HashSet::new());
    for (i, call) in calls.into_iter().enumerate() {
        let answered = call.await.unwrap().expect("an update without an etag is never refused");
        if i % 2 == 0 {
            assert_eq!(answered.name, format!("Kettle {i}"), "answered with its own change");
            names.insert(answered.name);
        } else {
            assert_eq!(answered.price, format!("{i}.00"), "answered with its own change");
            prices.insert(answered.price);
        }
    }
    let after = stack
        .products()
        .await
        .get_product(bearer(GetProductRequest { id: original.id }, &token))
        .await
        .unwrap()
        .into_inner();
    assert!(names.contains(&after.name) && prices.contains(&after.price), "{after:?}");
    assert_eq!((after.stock, after.description), (original.stock, original.description), "untouched fields");
    let db = stack.db.open().await;
    let version: i64 = on_db!(&db, pool => {
        sqlx::query_scalar("SELECT version FROM products WHERE id = ?").bind(original.id).fetch_one(pool).await
    })
    .unwrap();
    assert_eq!(version, 1 + WRITERS as i64, "one version per update");
    assert_ne!(after.etag, original.etag);
}

async fn create_with_a_request_id_is_idempotent(backend: Backend) {
    let stack = TestStack::start(backend).await;
    let token = stack.admin_token("admin").await;
    let mut products = stack.products().await;
    let request = CreateProductRequest {
        product: Some(product("Mug", "8.00", 3)),
        request_id: "6f1c2d4e-8a8b-4c1e-9d3f-2b7a5e0c9f11".into(),
    };
    let first = products.create_product(bearer(request.clone(), &token)).await.unwrap().into_inner();
    let retry = products.create_product(bearer(request.clone(), &token)).await.unwrap().into_inner();
    assert_eq!(first, retry);
    assert_eq!(count_products(&stack.db.open().await).await, 1);

    let mut different = request;
    different.product = Some(product("Mug", "9.00", 3));
    let err = products.create_product(bearer(different, &token)).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert_eq!(count_products(&stack.db.open().await).await, 1);
}

async fn prices_are_stored_as_exact_decimals(backend: Backend) {
    let stack = TestStack::start(backend.clone()).await;
    let token = stack.admin_token("admin").await;
    let p = create(&stack, &token, product("Exact", "9999999999.99", 1)).await;
    assert_eq!(p.price, "9999999999.99");
    let small = create(&stack, &token, product("Small", "0.1", 1)).await;
    assert_eq!(small.price, "0.10");

    let db = stack.db.open().await;
    let stored_type: String = match backend {
        Backend::Sqlite => on_db!(&db, pool => {
            sqlx::query_scalar("SELECT typeof(price) FROM products WHERE id = ?").bind(p.id).fetch_one(pool).await
        })
        .unwrap(),
        Backend::MySql(_) => on_db!(&db, pool => {
            sqlx::query_scalar(
                "SELECT CAST(COLUMN_TYPE AS CHAR) FROM information_schema.COLUMNS \
                 WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = 'products' AND COLUMN_NAME = 'price'",
            )
            .fetch_one(pool)
            .await
        })
        .unwrap(),
    };
    assert!(["text", "decimal(12,2)"].contains(&stored_type.as_str()), "{stored_type}");
    let stored: String = on_db!(&db, pool => {
        sqlx::query_scalar("SELECT CAST(price AS CHAR) FROM products WHERE id = ?").bind(small.id).fetch_one(pool).await
    })
    .unwrap();
    // SQLite keeps fixed-width text so that text order is numeric order.
    let expected = if matches!(backend, Backend::Sqlite) { "0000000000.10" } else { "0.10" };
    assert_eq!(stored, expected);
}

/// Each server's reflection describes what it serves, and only that: a
/// client listing product-service must not be sent to an AuthService there.
async fn health_and_reflection_are_served(backend: Backend) {
    use tokio_stream::StreamExt as _;
    let stack = TestStack::start(backend).await;
    let auth = ("storegate.auth.v1.AuthService", "storegate.auth.v1.RegisterRequest");
    let products = ("storegate.product.v1.ProductService", "storegate.product.v1.Product");
    // auth-service also serves AdminService, from its own .proto file.
    let admin: &[&str] = &["storegate.auth.v1.AdminService"];
    for (addr, (own, own_symbol), also, (other, other_symbol)) in
        [(stack.auth_addr, auth, admin, products), (stack.product_addr.unwrap(), products, &[][..], auth)]
    {
        let channel = TestStack::channel(addr).await;

        let mut v1 =
            tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient::new(channel.clone());
        let request = tonic_reflection::pb::v1::ServerReflectionRequest {
            host: String::new(),
            message_request: Some(
                tonic_reflection::pb::v1::server_reflection_request::MessageRequest::ListServices(
                    String::new(),
                ),
            ),
        };
        let mut responses =
            v1.server_reflection_info(tokio_stream::once(request)).await.unwrap().into_inner();
        let Some(
            tonic_reflection::pb::v1::server_reflection_response::MessageResponse::ListServicesResponse(list),
        ) = responses.next().await.unwrap().unwrap().message_response
        else {
            panic!("no service list");
        };
        let names: HashSet<_> = list.service.into_iter().map(|s| s.name).collect();
        assert!(names.contains("grpc.health.v1.Health"), "{names:?}");
        assert!(names.contains(own), "{own} is listed: {names:?}");
        assert!(!names.contains(other), "{other} is not served here, so not listed: {names:?}");
        assert!(also.iter().all(|n| names.contains(*n)), "{also:?} listed: {names:?}");
        assert!(
            names.iter().all(|n| [own, "grpc.health.v1.Health"].contains(&n.as_str())
                || also.contains(&n.as_str())
                || n.starts_with("grpc.reflection.")),
            "nothing else is listed: {names:?}"
        );

        let mut v1alpha =
            tonic_reflection::pb::v1alpha::server_reflection_client::ServerReflectionClient::new(
                channel.clone(),
            );
        let mut resolve = async |symbol: &str| {
            let request = tonic_reflection::pb::v1alpha::ServerReflectionRequest {
                host: String::new(),
                message_request: Some(tonic_reflection::pb::v1alpha::server_reflection_request::MessageRequest::FileContainingSymbol(
                    symbol.into(),
                )),
            };
            let mut responses =
                v1alpha.server_reflection_info(tokio_stream::once(request)).await.unwrap().into_inner();
            match responses.next().await.unwrap() {
                Ok(response) => matches!(
                    response.message_response,
                    Some(tonic_reflection::pb::v1alpha::server_reflection_response::MessageResponse::FileDescriptorResponse(_))
                ),
                Err(status) => {
                    assert_eq!(status.code(), Code::NotFound, "{status:?}");
                    false
                }
            }
        };
        assert!(resolve(own_symbol).await, "v1alpha resolves {own_symbol}");
        assert!(!resolve(other_symbol).await, "{other_symbol} belongs to the other service");

        let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
        let status = health
            .check(tonic_health::pb::HealthCheckRequest { service: String::new() })
            .await
            .unwrap()
            .into_inner()
            .status;
        assert_eq!(status, tonic_health::pb::health_check_response::ServingStatus::Serving as i32);
    }
    stack.stop().await;
}

/// The role table of the README: admin every change; catalogue-editor
/// creates and updates; stock-keeper adjusts stock; any signed-in caller
/// reads. A refused change is PERMISSION_DENIED and changes nothing.
async fn each_role_makes_exactly_the_changes_the_role_table_allows(backend: Backend) {
    use product_service::service::Change;
    let stack = TestStack::start(backend).await;
    let admin = stack.admin_token("root").await;
    let db = stack.db.open().await;
    let table: [(&str, &[Change]); 4] = [
        ("admin", &[Change::Create, Change::Update, Change::AdjustStock, Change::Delete]),
        ("catalogue-editor", &[Change::Create, Change::Update]),
        ("stock-keeper", &[Change::AdjustStock]),
        ("", &[]),
    ];
    for (role, allowed) in table {
        let roles: Vec<&str> = [role].into_iter().filter(|r| !r.is_empty()).collect();
        let token = stack
            .token_with_roles(&format!("caller-{}", if role.is_empty() { "none" } else { role }), &roles)
            .await;
        let mut products = stack.products().await;
        for change in [Change::Create, Change::Update, Change::AdjustStock, Change::Delete] {
            let target = create(&stack, &admin, product("Kettle", "30.00", 5)).await;
            let before = count_products(&db).await;
            let outcome = match change {
                Change::Create => products
                    .create_product(bearer(
                        CreateProductRequest {
                            product: Some(product("Mug", "4.00", 1)),
                            request_id: String::new(),
                        },
                        &token,
                    ))
                    .await
                    .map(drop),
                Change::Update => products
                    .update_product(bearer(
                        UpdateProductRequest {
                            product: Some(Product {
                                id: target.id,
                                name: "Kettle II".into(),
                                ..Default::default()
                            }),
                            update_mask: mask(&["name"]),
                        },
                        &token,
                    ))
                    .await
                    .map(drop),
                Change::AdjustStock => products
                    .adjust_stock(bearer(
                        AdjustStockRequest { id: target.id, delta: -1, request_id: String::new() },
                        &token,
                    ))
                    .await
                    .map(drop),
                Change::Delete => products
                    .delete_product(bearer(
                        DeleteProductRequest { id: target.id, etag: String::new() },
                        &token,
                    ))
                    .await
                    .map(drop),
            };
            let after = products
                .get_product(bearer(GetProductRequest { id: target.id }, &token))
                .await
                .map(|r| r.into_inner());
            if allowed.contains(&change) {
                outcome.unwrap_or_else(|e| panic!("{role:?} may {change:?}: {e:?}"));
            } else {
                let err = outcome.expect_err(&format!("{role:?} may not {change:?}"));
                assert_eq!(err.code(), Code::PermissionDenied, "{role:?} {change:?}: {err:?}");
                assert!(err.message().contains("role"), "the message names what is needed: {err:?}");
                assert_eq!(after.expect("reads need no role"), target, "{role:?} {change:?} changed nothing");
                assert_eq!(count_products(&db).await, before);
            }
        }
    }
}
