//! Another service's view of storegate: only the root crate's generated
//! stubs, a two-step login and a product listing.
//!
//!     cargo run --example login_and_list -- <username> <password>
//!
//! It asks for the code from the authenticator app on standard input.
//! AUTH_SERVICE_URL and PRODUCT_SERVICE_URL default to the `storegate up` ports.
//! For `https://` URLs it speaks TLS, verifying the servers against the
//! system roots or the CA in STOREGATE_CA_FILE; it never falls back to
//! plaintext (tonic refuses an https URL it has no TLS settings for).

use std::io::{BufRead as _, Write as _};

use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

use storegate::pb::{
    auth::v1::{BeginLoginRequest, CompleteLoginRequest, auth_service_client::AuthServiceClient},
    product::v1::{ListProductsRequest, product_service_client::ProductServiceClient},
};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let (Some(username), Some(password)) = (args.next(), args.next()) else {
        eprintln!("usage: login_and_list <username> <password>");
        std::process::exit(2);
    };
    let auth_url = std::env::var("AUTH_SERVICE_URL").unwrap_or_else(|_| "http://127.0.0.1:50051".into());
    let product_url =
        std::env::var("PRODUCT_SERVICE_URL").unwrap_or_else(|_| "http://127.0.0.1:50052".into());

    let mut auth = AuthServiceClient::new(connect(auth_url).await?);
    let begun = auth.begin_login(BeginLoginRequest { username, password }).await?.into_inner();
    if let Some(enrollment) = begun.enrollment {
        println!("first login: add this to your authenticator app: {}", enrollment.otpauth_uri);
    }
    print!("code: ");
    std::io::stdout().flush()?;
    let mut code = String::new();
    std::io::stdin().lock().read_line(&mut code)?;
    let tokens = auth
        .complete_login(CompleteLoginRequest { login_ticket: begun.login_ticket, code: code.trim().into() })
        .await?
        .into_inner();

    // Every product call carries the access token.
    let mut products = ProductServiceClient::new(connect(product_url).await?);
    let mut request = tonic::Request::new(ListProductsRequest { page_size: 20, ..Default::default() });
    request.metadata_mut().insert("authorization", format!("Bearer {}", tokens.access_token).parse()?);
    let page = products.list_products(request).await?.into_inner();
    println!("{} products:", page.total_size);
    for p in page.products {
        println!("{:>6}  {:<40} {:>12}  stock {}", p.id, p.name, p.price, p.stock);
    }
    Ok(())
}

/// A channel to `url`: TLS for https:// (the CA in STOREGATE_CA_FILE, else
/// the system roots), plaintext for http://.
async fn connect(url: String) -> Result<Channel, Box<dyn std::error::Error>> {
    let mut endpoint = Endpoint::from_shared(url)?;
    if endpoint.uri().scheme_str() == Some("https") {
        let tls = match std::env::var_os("STOREGATE_CA_FILE") {
            Some(ca) => ClientTlsConfig::new().ca_certificate(Certificate::from_pem(std::fs::read(ca)?)),
            None => ClientTlsConfig::new().with_native_roots(),
        };
        endpoint = endpoint.tls_config(tls)?;
    }
    Ok(endpoint.connect().await?)
}
