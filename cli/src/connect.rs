//! Where the services are, and a client for each.

use anyhow::Context as _;
use storegate::pb::{
    auth::v1::{RefreshTokenRequest, auth_service_client::AuthServiceClient},
    product::v1::product_service_client::ProductServiceClient,
};
use tonic::transport::Channel;

use crate::session::{Session, unix_now};

#[derive(clap::Args)]
pub struct Endpoints {
    /// auth-service.
    #[arg(long, global = true, env = "AUTH_SERVICE_URL", default_value = "http://127.0.0.1:50051")]
    pub auth_url: String,
    /// product-service.
    #[arg(long, global = true, env = "PRODUCT_SERVICE_URL", default_value = "http://127.0.0.1:50052")]
    pub product_url: String,
}

async fn channel(url: &str) -> anyhow::Result<Channel> {
    Ok(Channel::from_shared(url.to_owned())
        .with_context(|| format!("{url} is not a valid URL"))?
        .connect_timeout(std::time::Duration::from_secs(5))
        .connect()
        .await
        .map_err(|_| tonic::Status::unavailable(format!("cannot reach {url}")))?)
}

impl Endpoints {
    pub async fn auth(&self) -> anyhow::Result<AuthServiceClient<Channel>> {
        Ok(AuthServiceClient::new(channel(&self.auth_url).await?))
    }

    pub async fn products(&self) -> anyhow::Result<ProductServiceClient<Channel>> {
        Ok(ProductServiceClient::new(channel(&self.product_url).await?))
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
