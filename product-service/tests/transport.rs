//! TLS on both services and on product-service's key fetch, with
//! certificates made at test time: what is served, what is verified, and
//! that an https:// URL is never spoken to in plaintext.

use std::{path::Path, sync::Arc, time::Duration};

use product_service::ProductConfig;
use storegate::{
    pb::{
        auth::v1::{GetJwksRequest, auth_service_client::AuthServiceClient},
        product::v1::{ListProductsRequest, product_service_client::ProductServiceClient},
    },
    tls::ClientTlsFiles,
};
use storegate_testkit::{
    Backend, Running, TestDb, TestStack, bearer,
    certs::{PemFiles, TestCa},
    channel_to, wait_serving_at,
};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

fn scratch(name: &str) -> tempdir::Dir {
    tempdir::Dir::new(name)
}

mod tempdir {
    pub struct Dir(pub std::path::PathBuf);
    impl Dir {
        pub fn new(name: &str) -> Dir {
            let path = std::env::temp_dir().join(format!(
                "storegate-tls-{name}-{}-{}",
                std::process::id(),
                std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos()
            ));
            std::fs::create_dir_all(&path).unwrap();
            Dir(path)
        }
    }
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

fn trusting(ca: &TestCa) -> ClientTlsFiles {
    ClientTlsFiles { ca: Some(ca.ca_file.clone()), ..Default::default() }
}

/// auth-service over TLS with `server`'s certificate (and, for mTLS,
/// client certificates from `client_ca`).
async fn auth_over_tls(db: &TestDb, server: &PemFiles, client_ca: Option<&Path>) -> Running {
    let mut config = TestStack::auth_config(db);
    config.common.tls_cert_file = Some(server.cert.clone());
    config.common.tls_key_file = Some(server.key.clone());
    config.common.tls_client_ca_file = client_ca.map(Path::to_owned);
    config.common.tls_reload_interval_secs = 1;
    Running::auth(config).await
}

async fn get_jwks(url: &str, tls: &ClientTlsFiles) -> anyhow::Result<String> {
    let channel = channel_to(url, tls).await?;
    Ok(AuthServiceClient::new(channel).get_jwks(GetJwksRequest {}).await?.into_inner().jwks_json)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn grpc_and_grpc_web_are_served_over_tls() {
    let dir = scratch("served");
    let ca = TestCa::new(&dir.0, "good");
    let db = TestDb::new(&Backend::Sqlite).await;
    let auth = auth_over_tls(&db, &ca.server("auth"), None).await;
    let url = format!("https://localhost:{}", auth.addr.port());
    assert!(wait_serving_at(&url, &trusting(&ca), Duration::from_secs(30)).await, "health over TLS (h2)");
    let jwks = get_jwks(&url, &trusting(&ca)).await.expect("GetJwks over TLS");
    assert!(jwks.contains("Ed25519"), "{jwks}");

    // The same port in plaintext gets no answer: the server speaks TLS only.
    let plain = get_jwks(&format!("http://127.0.0.1:{}", auth.addr.port()), &ClientTlsFiles::default()).await;
    assert!(plain.is_err(), "a plaintext call to the TLS port must fail");

    // gRPC-Web: HTTP/1.1 over TLS (ALPN http/1.1), as a browser sends it.
    let response = grpc_web_over_tls(auth.addr.port(), &ca).await;
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    assert!(response.contains("application/grpc-web"), "{response}");
    assert!(response.contains("grpc-status:0"), "{response}");
}

/// A GetJwks over gRPC-Web (HTTP/1.1, TLS); returns the raw response.
async fn grpc_web_over_tls(port: u16, ca: &TestCa) -> String {
    let mut roots = rustls::RootCertStore::empty();
    let pem = std::fs::read(&ca.ca_file).unwrap();
    for cert in rustls::pki_types::CertificateDer::pem_slice_iter(&pem) {
        roots.add(cert.unwrap()).unwrap();
    }
    use rustls::pki_types::pem::PemObject as _;
    let mut config =
        rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let mut tls = connector.connect("localhost".try_into().unwrap(), tcp).await.expect("TLS handshake");
    let request = "POST /storegate.auth.v1.AuthService/GetJwks HTTP/1.1\r\nhost: localhost\r\n\
                   content-type: application/grpc-web+proto\r\nx-grpc-web: 1\r\ncontent-length: 5\r\n\
                   connection: close\r\n\r\n";
    tls.write_all(request.as_bytes()).await.unwrap();
    tls.write_all(&[0, 0, 0, 0, 0]).await.unwrap();
    let mut response = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), tls.read_to_end(&mut response)).await;
    String::from_utf8_lossy(&response).into_owned()
}

/// product-service over TLS with `server`'s certificate, its keys from the
/// stack's (plaintext, loopback) auth-service.
async fn product_over_tls(stack: &TestStack, server: &PemFiles) -> Running {
    let mut config = ProductConfig::with_database_url(&stack.db.url);
    config.auth_service_url = format!("http://{}", stack.auth_addr);
    config.common.tls_cert_file = Some(server.cert.clone());
    config.common.tls_key_file = Some(server.key.clone());
    Running::product(config).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn product_service_serves_tls_and_clients_check_its_name() {
    let dir = scratch("product");
    let ca = TestCa::new(&dir.0, "good");
    let stack = TestStack::start_auth(Backend::Sqlite).await;
    let token = stack.admin_token("alice").await;
    let product = product_over_tls(&stack, &ca.server("product")).await;
    let url = format!("https://localhost:{}", product.addr.port());
    assert!(wait_serving_at(&url, &trusting(&ca), Duration::from_secs(30)).await, "health over TLS");
    let channel = channel_to(&url, &trusting(&ca)).await.unwrap();
    let listed = ProductServiceClient::new(channel)
        .list_products(bearer(ListProductsRequest { page_size: 1, ..Default::default() }, &token))
        .await
        .expect("ListProducts over TLS");
    assert_eq!(listed.into_inner().total_size, 0);
    let plain = async {
        let url = format!("http://127.0.0.1:{}", product.addr.port());
        let channel = channel_to(&url, &ClientTlsFiles::default()).await?;
        let request = bearer(ListProductsRequest::default(), &token);
        anyhow::Ok(ProductServiceClient::new(channel).list_products(request).await?)
    };
    assert!(plain.await.is_err(), "a plaintext call to the TLS port must fail");

    // A certificate from the trusted CA, but for another host name: refused.
    let elsewhere =
        product_over_tls(&stack, &ca.server_for("elsewhere", &["elsewhere.storegate.test"])).await;
    let url = format!("https://localhost:{}", elsewhere.addr.port());
    let wrong_name = channel_to(&url, &trusting(&ca)).await;
    assert!(wrong_name.is_err(), "a certificate for another name must not be accepted for localhost");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_client_trusting_another_ca_is_refused() {
    let dir = scratch("wrong-ca");
    let (ca, other) = (TestCa::new(&dir.0, "good"), TestCa::new(&dir.0, "other"));
    let db = TestDb::new(&Backend::Sqlite).await;
    let auth = auth_over_tls(&db, &ca.server("auth"), None).await;
    let url = format!("https://localhost:{}", auth.addr.port());
    assert!(wait_serving_at(&url, &trusting(&ca), Duration::from_secs(30)).await);
    let refused = get_jwks(&url, &trusting(&other)).await;
    assert!(refused.is_err(), "a server certificate from an unknown CA must not be accepted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_plaintext_auth_service_behind_an_https_url_is_never_trusted() {
    let dir = scratch("downgrade");
    let ca = TestCa::new(&dir.0, "good");
    // auth-service in plaintext, product-service told it is at https://.
    let stack = TestStack::start_auth(Backend::Sqlite).await;
    let mut config = ProductConfig::with_database_url(&stack.db.url);
    config.auth_service_url = format!("https://localhost:{}", stack.auth_addr.port());
    config.auth_service_ca_file = Some(ca.ca_file.clone());
    let product = Running::product(config).await;
    let product_url = format!("http://{}", product.addr);

    // Never SERVING: it has no keys it may trust.
    assert!(
        !wait_serving_at(&product_url, &ClientTlsFiles::default(), Duration::from_secs(3)).await,
        "product-service must not report SERVING on keys fetched over a downgrade"
    );
    // And a real token minted by that auth-service is not accepted.
    let token = stack.admin_token("alice").await;
    let channel = channel_to(&product_url, &ClientTlsFiles::default()).await.unwrap();
    let listed = ProductServiceClient::new(channel)
        .list_products(bearer(ListProductsRequest { page_size: 1, ..Default::default() }, &token))
        .await;
    let status = listed.expect_err("no call may be accepted on keys from a plaintext server");
    assert!(matches!(status.code(), tonic::Code::Unauthenticated | tonic::Code::Unavailable), "{status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn product_service_fetches_keys_over_mtls_and_strangers_are_refused() {
    let dir = scratch("mtls");
    let ca = TestCa::new(&dir.0, "good");
    let clients = TestCa::new(&dir.0, "clients");
    let db = TestDb::new(&Backend::Sqlite).await;
    let auth = auth_over_tls(&db, &ca.server("auth"), Some(&clients.ca_file)).await;
    let url = format!("https://localhost:{}", auth.addr.port());

    // With a certificate the configured CA signed: served.
    let product_cert = clients.client("product-service");
    let with_cert = ClientTlsFiles {
        cert: Some(product_cert.cert.clone()),
        key: Some(product_cert.key.clone()),
        ..trusting(&ca)
    };
    assert!(
        wait_serving_at(&url, &with_cert, Duration::from_secs(30)).await,
        "mTLS with a certificate from the client CA"
    );
    get_jwks(&url, &with_cert).await.expect("GetJwks over mTLS");

    // Without a client certificate: the handshake (or the first call) fails.
    assert!(get_jwks(&url, &trusting(&ca)).await.is_err(), "mTLS must refuse a client without a certificate");
    // With one from another CA: refused too.
    let stranger = ca.client("stranger");
    let with_stranger =
        ClientTlsFiles { cert: Some(stranger.cert), key: Some(stranger.key), ..trusting(&ca) };
    assert!(get_jwks(&url, &with_stranger).await.is_err(), "a client certificate from another CA");

    // product-service with that certificate loads its keys and serves.
    let mut config = ProductConfig::with_database_url(&db.url);
    config.auth_service_url = url.clone();
    config.auth_service_ca_file = Some(ca.ca_file.clone());
    config.auth_service_cert_file = Some(product_cert.cert);
    config.auth_service_key_file = Some(product_cert.key);
    let product = Running::product(config).await;
    assert!(
        wait_serving_at(
            &format!("http://{}", product.addr),
            &ClientTlsFiles::default(),
            Duration::from_secs(30)
        )
        .await,
        "product-service fetches the keys over mTLS"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_renewed_certificate_is_served_without_a_restart() {
    let dir = scratch("reload");
    let (old_ca, new_ca) = (TestCa::new(&dir.0, "old"), TestCa::new(&dir.0, "new"));
    let db = TestDb::new(&Backend::Sqlite).await;
    let served = old_ca.server("auth");
    let auth = auth_over_tls(&db, &served, None).await;
    let url = format!("https://localhost:{}", auth.addr.port());
    assert!(wait_serving_at(&url, &trusting(&old_ca), Duration::from_secs(30)).await);
    assert!(get_jwks(&url, &trusting(&new_ca)).await.is_err(), "not yet the new certificate");

    // Renew: the new CA's certificate replaces the files' contents.
    let renewed = new_ca.server("renewed");
    std::fs::copy(&renewed.cert, &served.cert).unwrap();
    std::fs::copy(&renewed.key, &served.key).unwrap();
    assert!(
        wait_serving_at(&url, &trusting(&new_ca), Duration::from_secs(10)).await,
        "the renewed certificate is served within the reload interval"
    );

    // A broken file keeps the last good certificate.
    std::fs::write(&served.key, "not a key").unwrap();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert!(get_jwks(&url, &trusting(&new_ca)).await.is_ok(), "a bad new key keeps the current certificate");
    assert!(!auth.is_finished(), "the server keeps running");
}

#[tokio::test]
async fn a_certificate_without_its_key_is_a_start_up_error() {
    let dir = scratch("half");
    let ca = TestCa::new(&dir.0, "good");
    let db = TestDb::new(&Backend::Sqlite).await;
    let mut config = TestStack::auth_config(&db);
    config.common.tls_cert_file = Some(ca.server("auth").cert);
    let auth = Running::auth(config).await;
    let error = auth.stop().await.expect_err("a certificate without a key must not start");
    assert!(format!("{error:#}").contains("TLS_KEY_FILE"), "{error:#}");
}

/// product-service with its keys from `jwks_url` (JWKS_URL, the key set over
/// plain HTTP GET) and an AUTH_SERVICE_URL where nothing answers: the keys
/// can only come from the URL.
async fn product_with_jwks_url(db: &TestDb, jwks_url: String, ca: Option<&TestCa>) -> (Running, String) {
    let mut config = ProductConfig::with_database_url(&db.url);
    config.auth_service_url = "http://127.0.0.1:1".into();
    config.jwks_url = Some(jwks_url);
    config.auth_service_ca_file = ca.map(|ca| ca.ca_file.clone());
    let product = Running::product(config).await;
    let url = format!("http://{}", product.addr);
    (product, url)
}

async fn list_with(url: &str, token: &str) -> Result<i64, tonic::Status> {
    let channel = channel_to(url, &ClientTlsFiles::default()).await.unwrap();
    let listed = ProductServiceClient::new(channel)
        .list_products(bearer(ListProductsRequest { page_size: 1, ..Default::default() }, token))
        .await?;
    Ok(listed.into_inner().total_size)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn product_service_takes_its_keys_from_a_jwks_url() {
    let stack = TestStack::start_auth(Backend::Sqlite).await;
    let token = stack.admin_token("alice").await;
    let jwks_url = format!("http://{}/.well-known/jwks.json", stack.auth_addr);
    let (_product, url) = product_with_jwks_url(&stack.db, jwks_url, None).await;
    assert!(
        wait_serving_at(&url, &ClientTlsFiles::default(), Duration::from_secs(30)).await,
        "SERVING on keys fetched from JWKS_URL"
    );
    assert_eq!(list_with(&url, &token).await.expect("a real token verifies"), 0);
    let forged = format!("{}x", &token[..token.len() - 1]);
    assert_eq!(list_with(&url, &forged).await.unwrap_err().code(), tonic::Code::Unauthenticated);

    // Fetched again, the unchanged set comes back (the server answers the
    // ETag with 304, and the last set stands).
    let source = product_service::jwks_url::JwksUrl::new(
        &format!("http://{}/.well-known/jwks.json", stack.auth_addr),
        &ClientTlsFiles::default(),
    )
    .unwrap();
    let first = source.fetch().await.unwrap();
    assert!(first.contains("Ed25519"), "{first}");
    assert_eq!(source.fetch().await.unwrap(), first);
    for (bad, why) in [("ftp://127.0.0.1/jwks.json", "http:// or https://"), ("http:///jwks.json", "URL")] {
        let error = product_service::jwks_url::JwksUrl::new(bad, &ClientTlsFiles::default()).err().unwrap();
        assert!(format!("{error:#}").contains(why), "{bad}: {error:#}");
    }
    let with_ca = ClientTlsFiles { ca: Some("/nonexistent/ca.pem".into()), ..Default::default() };
    let error =
        product_service::jwks_url::JwksUrl::new("http://127.0.0.1/jwks.json", &with_ca).err().unwrap();
    assert!(format!("{error:#}").contains("https://"), "{error:#}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_jwks_url_over_tls_is_verified_and_never_downgraded() {
    let dir = scratch("jwks-url");
    let ca = TestCa::new(&dir.0, "good");
    let db = TestDb::new(&Backend::Sqlite).await;
    let auth = auth_over_tls(&db, &ca.server("auth"), None).await;
    let auth_url = format!("https://localhost:{}", auth.addr.port());
    assert!(wait_serving_at(&auth_url, &trusting(&ca), Duration::from_secs(30)).await);
    let (_product, url) =
        product_with_jwks_url(&db, format!("{auth_url}/.well-known/jwks.json"), Some(&ca)).await;
    assert!(
        wait_serving_at(&url, &ClientTlsFiles::default(), Duration::from_secs(30)).await,
        "keys fetched over verified TLS"
    );

    // A plaintext server behind an https:// JWKS_URL: no key is ever taken.
    let plain = TestStack::start_auth(Backend::Sqlite).await;
    let downgrade = format!("https://localhost:{}/.well-known/jwks.json", plain.auth_addr.port());
    let (_product, url) = product_with_jwks_url(&plain.db, downgrade, Some(&ca)).await;
    assert!(
        !wait_serving_at(&url, &ClientTlsFiles::default(), Duration::from_secs(3)).await,
        "product-service must not report SERVING on keys fetched over a downgrade"
    );
    let token = plain.admin_token("mallory").await;
    let status = list_with(&url, &token).await.expect_err("no call accepted without trusted keys");
    assert!(matches!(status.code(), tonic::Code::Unauthenticated | tonic::Code::Unavailable), "{status:?}");
}
