//! Where the services are, and a client for each.

use std::{path::PathBuf, time::Duration};

use anyhow::Context as _;
use storegate::pb::{
    auth::v1::{RefreshTokenRequest, auth_service_client::AuthServiceClient},
    product::v1::product_service_client::ProductServiceClient,
};
use storegate::tls::ClientTlsFiles;
use tonic::{service::interceptor::InterceptedService, transport::Channel};

/// Passes the command's trace on with every call.
type Propagate = fn(tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status>;
/// A channel whose calls carry the command's trace (W3C `traceparent`).
pub type Traced = InterceptedService<Channel, Propagate>;

use crate::session::{Session, unix_now};

#[derive(clap::Args)]
pub struct Endpoints {
    /// auth-service.
    #[arg(long, global = true, env = "AUTH_SERVICE_URL", default_value = "http://127.0.0.1:50051")]
    pub auth_url: String,
    /// product-service.
    #[arg(long, global = true, env = "PRODUCT_SERVICE_URL", default_value = "http://127.0.0.1:50052")]
    pub product_url: String,
    /// PEM CA that signs the services' certificates (https:// URLs);
    /// without it, the system roots.
    #[arg(long, global = true, env = "STOREGATE_CA_FILE")]
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate, for services that require one (mTLS).
    #[arg(long, global = true, env = "STOREGATE_CLIENT_CERT_FILE", requires = "client_key_file")]
    pub client_cert_file: Option<PathBuf>,
    /// PEM private key of --client-cert-file.
    #[arg(long, global = true, env = "STOREGATE_CLIENT_KEY_FILE", requires = "client_cert_file")]
    pub client_key_file: Option<PathBuf>,
    /// Act as this service account (OAuth 2.0 client credentials) instead
    /// of the stored session. Its secret comes from STOREGATE_CLIENT_SECRET
    /// or --client-secret-file, never from the command line.
    #[arg(long, global = true, env = "STOREGATE_CLIENT_ID")]
    pub client_id: Option<String>,
    /// A file holding the service account's secret (its first line).
    #[arg(long, global = true, env = "STOREGATE_CLIENT_SECRET_FILE", requires = "client_id")]
    pub client_secret_file: Option<PathBuf>,
}

impl Endpoints {
    /// A connection to `url`: TLS, verified, for https:// (a server that
    /// does not speak it is an error, never a plaintext fallback: the
    /// password would travel in clear).
    async fn channel(&self, url: &str, what: &str) -> anyhow::Result<Channel> {
        let tls = self.tls_files();
        let endpoint =
            storegate::tls::client_endpoint(url, what, &tls)?.connect_timeout(Duration::from_secs(5));
        let secure = url.starts_with("https://");
        endpoint.connect().await.map_err(|e| {
            if secure {
                // The TLS failure (unknown CA, plaintext server, wrong name)
                // is what the user needs to see.
                anyhow::Error::new(e).context(format!("cannot connect securely to {url}"))
            } else {
                tonic::Status::unavailable(format!("cannot reach {url}")).into()
            }
        })
    }

    pub async fn auth(&self) -> anyhow::Result<AuthServiceClient<Traced>> {
        let channel = self.channel(&self.auth_url, "AUTH_SERVICE_URL").await?;
        Ok(AuthServiceClient::with_interceptor(channel, storegate::telemetry::propagate as Propagate))
    }

    pub async fn products(&self) -> anyhow::Result<ProductServiceClient<Traced>> {
        let channel = self.channel(&self.product_url, "PRODUCT_SERVICE_URL").await?;
        Ok(ProductServiceClient::with_interceptor(channel, storegate::telemetry::propagate as Propagate))
    }

    /// The service account's token (with --client-id), from the token
    /// endpoint of AUTH_SERVICE_URL, as a session of its own that is never
    /// stored.
    pub async fn service_session(&self, client_id: &str) -> anyhow::Result<Session> {
        let secret = match &self.client_secret_file {
            Some(file) => std::fs::read_to_string(file)
                .with_context(|| format!("cannot read the client secret file {}", file.display()))?
                .lines()
                .next()
                .unwrap_or_default()
                .trim()
                .to_owned(),
            None => std::env::var("STOREGATE_CLIENT_SECRET")
                .context("--client-id needs STOREGATE_CLIENT_SECRET or --client-secret-file")?,
        };
        let credentials = storegate::token_source::ClientCredentials {
            token_url: format!("{}/oauth2/token", self.auth_url.trim_end_matches('/')),
            client_id: client_id.to_owned(),
            client_secret: secret.into(),
            scope: None,
        };
        let source = storegate::token_source::TokenSource::new(credentials, &self.tls_files())?;
        let bearer = source.bearer().await?;
        let token = bearer.to_str()?.trim_start_matches("Bearer ").to_owned();
        Ok(Session {
            username: client_id.to_owned(),
            access_token: token,
            refresh_token: String::new(),
            expires_at: unix_now() + 60,
            devices: Default::default(),
        })
    }

    fn tls_files(&self) -> ClientTlsFiles {
        ClientTlsFiles {
            ca: self.ca_file.clone(),
            cert: self.client_cert_file.clone(),
            key: self.client_key_file.clone(),
        }
    }

    /// The stored session, refreshed first if its access token is about to
    /// expire (the refresh token rotates, so the new one is saved).
    pub async fn session(&self) -> anyhow::Result<Session> {
        let mut session = Session::load()?.context("not signed in: run `storegate login <username>`")?;
        if session.expires_soon() {
            session = self.refresh(session).await?;
        }
        Ok(session)
    }

    pub async fn refresh(&self, mut session: Session) -> anyhow::Result<Session> {
        let refreshed = self
            .auth()
            .await?
            .refresh_token(RefreshTokenRequest { refresh_token: session.refresh_token.clone() })
            .await
            .map_err(|status| {
                if status.code() == tonic::Code::Unauthenticated {
                    tonic::Status::unauthenticated("the session has expired: run `storegate login` again")
                } else {
                    status
                }
            })?
            .into_inner();
        session.access_token = refreshed.access_token;
        session.refresh_token = refreshed.refresh_token;
        session.expires_at = unix_now() + refreshed.expires_in;
        session.save()?;
        Ok(session)
    }
}

/// A request with the session's bearer token.
pub fn authorized<T>(message: T, session: &Session) -> anyhow::Result<tonic::Request<T>> {
    let mut request = tonic::Request::new(message);
    request.metadata_mut().insert(
        "authorization",
        format!("Bearer {}", session.access_token).parse().context("the stored token is not valid ASCII")?,
    );
    Ok(request)
}
