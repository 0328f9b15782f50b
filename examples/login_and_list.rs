//! Another service's view of storegate: only the root crate (its generated
//! stubs and its client endpoint), a two-step login and a product listing.
//!
//!     cargo run --example login_and_list -- <username>
//!
//! It reads the password, then the code from the authenticator app, from
//! standard input, one line each (never from the command line, where `ps`
//! would show it). AUTH_SERVICE_URL and PRODUCT_SERVICE_URL default to the
//! `storegate up` ports. `https://` URLs are spoken to over TLS, verifying
//! the servers against the system roots or the CA in STOREGATE_CA_FILE
//! (with STOREGATE_CLIENT_CERT_FILE / STOREGATE_CLIENT_KEY_FILE for mTLS);
//! it never falls back to plaintext, and warns of plaintext to a host other
//! than this machine.

use std::io::{BufRead as _, Write as _};

use storegate::{
    pb::{
        auth::v1::{BeginLoginRequest, CompleteLoginRequest, auth_service_client::AuthServiceClient},
        product::v1::{ListProductsRequest, product_service_client::ProductServiceClient},
    },
    tls::{ClientTlsFiles, client_endpoint},
};
use tonic::transport::Channel;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let _telemetry = storegate::telemetry::init(storegate::telemetry::LogFormat::Text, "login-and-list");
    let Some(username) = std::env::args().nth(1) else {
        eprintln!("usage: login_and_list <username>   (password and code on standard input)");
        std::process::exit(2);
    };
    let tls = ClientTlsFiles {
        ca: std::env::var_os("STOREGATE_CA_FILE").map(Into::into),
        cert: std::env::var_os("STOREGATE_CLIENT_CERT_FILE").map(Into::into),
        key: std::env::var_os("STOREGATE_CLIENT_KEY_FILE").map(Into::into),
    };
    let auth_url = std::env::var("AUTH_SERVICE_URL").unwrap_or_else(|_| "http://127.0.0.1:50051".into());
    let product_url =
        std::env::var("PRODUCT_SERVICE_URL").unwrap_or_else(|_| "http://127.0.0.1:50052".into());
    let mut auth = AuthServiceClient::new(connect(&auth_url, "AUTH_SERVICE_URL", &tls).await?);

    let password = prompt("password: ")?;
    let begun =
        auth.begin_login(BeginLoginRequest { username, password, ..Default::default() }).await?.into_inner();
    if let Some(enrollment) = begun.enrollment {
        println!("first login: add this to your authenticator app: {}", enrollment.otpauth_uri);
    }
    let code = prompt("code: ")?;
    let tokens = auth
        .complete_login(CompleteLoginRequest { login_ticket: begun.login_ticket, code })
        .await?
        .into_inner();

    // Every product call carries the access token.
    let mut products = ProductServiceClient::new(connect(&product_url, "PRODUCT_SERVICE_URL", &tls).await?);
    let mut request = tonic::Request::new(ListProductsRequest { page_size: 20, ..Default::default() });
    request.metadata_mut().insert("authorization", format!("Bearer {}", tokens.access_token).parse()?);
    let page = products.list_products(request).await?.into_inner();
    println!("{} products:", page.total_size);
    for p in page.products {
        println!("{:>6}  {:<40} {:>12}  stock {}", p.id, p.name, p.price, p.stock);
    }
    Ok(())
}

/// One line of standard input, without its line end.
fn prompt(what: &str) -> anyhow::Result<String> {
    print!("{what}");
    std::io::stdout().flush()?;
    let mut line = String::new();
    std::io::stdin().lock().read_line(&mut line)?;
    Ok(line.trim_end_matches(['\r', '\n']).to_owned())
}

/// A channel to `url` (named `what` in errors) through the root crate's
/// client endpoint: verified TLS for https://, plaintext only for http://.
async fn connect(url: &str, what: &str, tls: &ClientTlsFiles) -> anyhow::Result<Channel> {
    Ok(client_endpoint(url, what, tls)?.connect().await?)
}
