//! The AuthService gRPC API: validate → store → map.

use chrono::{DateTime, Duration, Utc};
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family},
};
use storegate::{
    ApiError,
    pb::auth::v1::{
        BeginLoginRequest, BeginLoginResponse, CompleteLoginRequest, CompleteLoginResponse, GetJwksRequest,
        GetJwksResponse, LogoutRequest, LogoutResponse, RefreshTokenRequest, RefreshTokenResponse,
        RegisterRequest, RegisterResponse, TotpEnrollment, auth_service_server::AuthService,
    },
    token::{ACCESS_TOKEN_TTL_SECS, Claims},
};
use tonic::{Request, Response, Status};

use crate::{
    crypto::{MasterKey, random_bytes, random_token, token_hash},
    domain::{Username, check_new_password, password_length_ok},
    keys::SigningKeys,
    password::PasswordHasher,
    recovery,
    store::{
        AuthStore, CompleteLoginRefused, CompletingLogin, NewRefreshToken, Rotation, SecondFactor, TotpState,
    },
    throttle, totp,
};

/// How long a login ticket may wait for its code.
pub const TICKET_TTL_SECS: i64 = 5 * 60;
/// How long a refresh token lives.
pub const REFRESH_TOKEN_TTL_DAYS: i64 = 30;

const BAD_CREDENTIALS: &str = "invalid username or password";
const BAD_TICKET: &str = "login ticket is invalid or expired; start the login again";
const BAD_CODE: &str = "invalid code";
const BAD_REFRESH_TOKEN: &str = "refresh token is invalid, expired or revoked; log in again";
/// Longest ticket or code we bother hashing; anything longer is not ours.
const MAX_OPAQUE_LEN: usize = 256;

/// A login whose transaction committed: what its answer carries besides the
/// access token.
struct CompletedLogin {
    refresh_token: String,
    /// Only on the call that confirmed the enrollment.
    recovery_codes: Vec<String>,
}

/// Everything the handlers share; cheap to clone.
#[derive(Clone)]
pub struct AuthState {
    pub store: AuthStore,
    pub hasher: PasswordHasher,
    pub keys: SigningKeys,
    pub master_key: MasterKey,
    pub issuer: String,
    pub audience: String,
    pub totp_issuer: String,
    /// Login steps by outcome, for the metrics endpoint.
    pub login_attempts: Family<LoginLabels, Counter>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LoginLabels {
    step: &'static str,
    outcome: &'static str,
}

impl AuthState {
    fn count_login<T>(&self, step: &'static str, outcome: &Result<T, ApiError>) {
        let outcome = match outcome {
            Ok(_) => "ok",
            Err(ApiError::Unauthenticated(_)) => "rejected",
            Err(ApiError::ResourceExhausted { message, .. }) if *message == throttle::THROTTLED => {
                "throttled"
            }
            Err(ApiError::ResourceExhausted { .. }) => "busy",
            Err(_) => "error",
        };
        self.login_attempts.get_or_create(&LoginLabels { step, outcome }).inc();
    }
}

pub struct AuthApi {
    state: AuthState,
}

impl AuthApi {
    pub fn new(state: AuthState) -> Self {
        AuthApi { state }
    }
}

fn totp_seal_context(user_id: i64) -> String {
    format!("totp_secret:user:{user_id}")
}

impl AuthState {
    fn open_totp_secret(&self, user_id: i64, sealed: &[u8]) -> Result<Vec<u8>, ApiError> {
        self.master_key.decrypt(sealed, &totp_seal_context(user_id)).map_err(|e| {
            ApiError::Internal(anyhow::Error::new(e).context(format!("TOTP secret of user {user_id}")))
        })
    }

    async fn register(&self, req: RegisterRequest) -> Result<RegisterResponse, ApiError> {
        let username = Username::parse(&req.username);
        // The guessability check is CPU work too: off the runtime, bounded
        // like hashing.
        let (password, raw_username) = (req.password.clone(), req.username.clone());
        let password = self.hasher.run(move || check_new_password(&password, &raw_username)).await?;
        ApiError::check([username.clone().err(), password.err()].into_iter().flatten().collect())?;
        let username = username.map_err(|v| ApiError::InvalidArgument(vec![v]))?;

        let password_hash = self.hasher.hash(req.password).await?;
        let secret = totp::new_secret();
        let user_id = self
            .store
            .create_user(
                username.as_str(),
                &password_hash,
                |id| self.master_key.encrypt(&secret, &totp_seal_context(id)),
                storegate::db::now(),
            )
            .await?;
        tracing::info!(user_id, "registered a user");
        Ok(RegisterResponse { user_id })
    }

    async fn begin_login(&self, req: BeginLoginRequest) -> Result<BeginLoginResponse, ApiError> {
        // Refused before any hashing or counting: it says nothing about the account.
        if !password_length_ok(&req.password) || req.username.len() > MAX_OPAQUE_LEN {
            return Err(ApiError::Unauthenticated(BAD_CREDENTIALS));
        }
        let now = storegate::db::now();
        let outcome = async {
            let attempt =
                throttle::admit(&self.store, throttle::subject(&req.username), now.timestamp()).await?;
            let outcome = self.check_password_and_issue_ticket(req, attempt.subject(), now).await;
            // A ticket is the outcome's last step, stored in the transaction
            // that gives the attempt back: an Ok has settled it.
            attempt.settle(&self.store, &outcome).await;
            outcome
        }
        .await;
        self.count_login("begin", &outcome);
        outcome
    }

    async fn check_password_and_issue_ticket(
        &self,
        req: BeginLoginRequest,
        throttle_subject: &[u8],
        now: DateTime<Utc>,
    ) -> Result<BeginLoginResponse, ApiError> {
        let user = match Username::parse(&req.username) {
            Ok(name) => self.store.find_login_user(name.as_str()).await?,
            Err(_) => None,
        };
        // Unknown users are checked against a dummy hash: same answer, same time.
        let (stored_hash, user) = match user {
            Some(u) => (Some(u.password_hash), Some((u.id, u.totp))),
            None => (None, None),
        };
        let password_ok = self.hasher.verify(req.password, stored_hash).await?;
        let Some((user_id, totp_state)) = user.filter(|_| password_ok) else {
            return Err(ApiError::Unauthenticated(BAD_CREDENTIALS));
        };

        // The secret goes out only after a correct password and only until
        // the first code confirms it. An account still enrolling is read
        // again: another login may have confirmed it during the hash.
        let confirmed = match totp_state.totp_confirmed_at {
            Some(_) => true,
            None => self.store.totp_confirmed(user_id).await?,
        };
        let enrollment = if confirmed {
            None
        } else {
            let secret = self.open_totp_secret(user_id, &totp_state.totp_secret)?;
            let e = totp::enrollment(&secret, &self.totp_issuer, &totp_state.username)?;
            Some(TotpEnrollment { otpauth_uri: e.otpauth_uri, qr_png: e.qr_png, secret: e.secret_base32 })
        };
        // Last, so that nothing can fail once the ticket is stored and the
        // attempt given back.
        let ticket = random_token();
        let expires_at = now + Duration::seconds(TICKET_TTL_SECS);
        self.store.create_ticket(&token_hash(&ticket), user_id, expires_at, now, throttle_subject).await?;
        tracing::info!(user_id, enrolling = enrollment.is_some(), "password accepted; ticket issued");
        Ok(BeginLoginResponse {
            login_ticket: ticket,
            ticket_expire_time: Some(prost_types::Timestamp { seconds: expires_at.timestamp(), nanos: 0 }),
            enrollment,
        })
    }

    async fn complete_login(&self, req: CompleteLoginRequest) -> Result<CompleteLoginResponse, ApiError> {
        if req.login_ticket.is_empty() || req.login_ticket.len() > MAX_OPAQUE_LEN {
            return Err(ApiError::Unauthenticated(BAD_TICKET));
        }
        let now = storegate::db::now();
        let ticket_hash = token_hash(&req.login_ticket);
        let ticket =
            self.store.live_ticket(&ticket_hash, now).await?.ok_or(ApiError::Unauthenticated(BAD_TICKET))?;
        let totp_state = &ticket.totp;

        // Wrong codes count against the account's name as wrong passwords do,
        // so a known password cannot buy unlimited code guesses.
        let outcome = async {
            let attempt =
                throttle::admit(&self.store, throttle::subject(&totp_state.username), now.timestamp())
                    .await?;
            let login = CompletingLogin {
                ticket_hash: &ticket_hash,
                user_id: ticket.user_id,
                throttle_subject: attempt.subject(),
            };
            let completed = self.check_code_and_complete(&req.code, &login, totp_state, now).await;
            // Settled by what the transaction did: once it committed (and
            // cleared the count), a failure to sign the token is no
            // attempt's outcome and must not refund a count added since.
            attempt.settle(&self.store, &completed).await;
            self.issue_tokens(ticket.user_id, &totp_state.username, completed?).await
        }
        .await;
        self.count_login("complete", &outcome);
        if matches!(outcome, Err(ApiError::Unauthenticated(BAD_CODE)))
            && let Err(e) = self.store.record_wrong_code(&ticket_hash).await
        {
            // The answer stays "invalid code"; the ticket still dies at expiry.
            tracing::warn!(error = %e, "cannot count a wrong code against its ticket");
        }
        outcome
    }

    /// Checks the code and completes the login in one transaction (see
    /// `AuthStore::complete_login`).
    async fn check_code_and_complete(
        &self,
        code: &str,
        login: &CompletingLogin<'_>,
        totp_state: &TotpState,
        now: DateTime<Utc>,
    ) -> Result<CompletedLogin, ApiError> {
        let user_id = login.user_id;
        let factor = if let Some(recovery_code) = recovery::normalise(code) {
            SecondFactor::RecoveryCode(recovery::hash(&self.master_key, &recovery_code))
        } else {
            let secret = self.open_totp_secret(user_id, &totp_state.totp_secret)?;
            let now_step = totp::step_at(u64::try_from(now.timestamp()).unwrap_or(0));
            let step = totp::matching_step(&secret, code, now_step, totp_state.totp_last_step)
                .ok_or(ApiError::Unauthenticated(BAD_CODE))?;
            SecondFactor::TotpStep(step)
        };
        // The call that confirms enrollment hands out the recovery codes.
        let recovery_codes =
            if totp_state.totp_confirmed_at.is_none() { recovery::generate() } else { Vec::new() };
        let recovery_hashes: Vec<Vec<u8>> = recovery_codes
            .iter()
            .filter_map(|c| recovery::normalise(c))
            .map(|c| recovery::hash(&self.master_key, &c))
            .collect();

        let refresh_token = random_token();
        let refresh = NewRefreshToken {
            token_hash: token_hash(&refresh_token),
            family: random_bytes::<16>().to_vec(),
            expires_at: now + Duration::days(REFRESH_TOKEN_TTL_DAYS),
        };
        let confirming = (!recovery_hashes.is_empty()).then_some(recovery_hashes.as_slice());
        let confirmed = match self.store.complete_login(login, &factor, confirming, &refresh, now).await? {
            Ok(confirmed) => confirmed,
            Err(CompleteLoginRefused::TicketInvalid) => return Err(ApiError::Unauthenticated(BAD_TICKET)),
            Err(CompleteLoginRefused::FactorSpent) => return Err(ApiError::Unauthenticated(BAD_CODE)),
        };

        let used_recovery_code = matches!(factor, SecondFactor::RecoveryCode(_));
        tracing::info!(user_id, confirmed_enrollment = confirmed, used_recovery_code, "login completed");
        Ok(CompletedLogin {
            refresh_token,
            recovery_codes: if confirmed { recovery_codes } else { Vec::new() },
        })
    }

    /// The answer to a completed login: its refresh token and recovery
    /// codes, and an access token signed now.
    async fn issue_tokens(
        &self,
        user_id: i64,
        username: &str,
        completed: CompletedLogin,
    ) -> Result<CompleteLoginResponse, ApiError> {
        Ok(CompleteLoginResponse {
            access_token: self.issue_access_token(user_id, username).await?,
            refresh_token: completed.refresh_token,
            token_type: "Bearer".to_owned(),
            expires_in: ACCESS_TOKEN_TTL_SECS,
            recovery_codes: completed.recovery_codes,
        })
    }

    async fn issue_access_token(&self, user_id: i64, username: &str) -> Result<String, ApiError> {
        let now = storegate::db::now().timestamp();
        let claims = Claims {
            iss: self.issuer.clone(),
            sub: user_id.to_string(),
            aud: self.audience.clone(),
            exp: now + ACCESS_TOKEN_TTL_SECS,
            iat: now,
            nbf: Some(now),
            jti: random_token(),
            roles: self.store.roles(user_id).await?,
            preferred_username: Some(username.to_owned()),
        };
        Ok(self.keys.sign(&claims).await?)
    }

    async fn refresh_token(&self, req: RefreshTokenRequest) -> Result<RefreshTokenResponse, ApiError> {
        if req.refresh_token.is_empty() || req.refresh_token.len() > MAX_OPAQUE_LEN {
            return Err(ApiError::Unauthenticated(BAD_REFRESH_TOKEN));
        }
        let now = storegate::db::now();
        let refresh_token = random_token();
        let rotation = self
            .store
            .rotate_refresh_token(
                &token_hash(&req.refresh_token),
                &token_hash(&refresh_token),
                now + Duration::days(REFRESH_TOKEN_TTL_DAYS),
                now,
            )
            .await?;
        let user_id = match rotation {
            Rotation::Rotated { user_id } => user_id,
            Rotation::Reused { user_id } => {
                tracing::warn!(user_id, "a rotated refresh token was presented again; its login is revoked");
                return Err(ApiError::Unauthenticated(BAD_REFRESH_TOKEN));
            }
            Rotation::Invalid => return Err(ApiError::Unauthenticated(BAD_REFRESH_TOKEN)),
        };
        let username =
            self.store.username(user_id).await?.ok_or(ApiError::Unauthenticated(BAD_REFRESH_TOKEN))?;
        let access_token = self.issue_access_token(user_id, &username).await?;
        Ok(RefreshTokenResponse {
            access_token,
            refresh_token,
            token_type: "Bearer".to_owned(),
            expires_in: ACCESS_TOKEN_TTL_SECS,
        })
    }

    async fn logout(&self, req: LogoutRequest) -> Result<LogoutResponse, ApiError> {
        // Like RFC 7009: an unknown token is not an error, there is nothing
        // to revoke and nothing to tell.
        if !req.refresh_token.is_empty() && req.refresh_token.len() <= MAX_OPAQUE_LEN {
            let revoked = self
                .store
                .revoke_refresh_family(&token_hash(&req.refresh_token), storegate::db::now())
                .await?;
            tracing::info!(revoked, "logout");
        }
        Ok(LogoutResponse {})
    }

    async fn get_jwks(&self) -> Result<GetJwksResponse, ApiError> {
        Ok(GetJwksResponse { jwks_json: self.keys.jwks_json().await?.to_string() })
    }
}

#[tonic::async_trait]
impl AuthService for AuthApi {
    #[tracing::instrument(name = "Register", skip_all)]
    async fn register(
        &self,
        request: Request<RegisterRequest>,
    ) -> Result<Response<RegisterResponse>, Status> {
        Ok(Response::new(self.state.register(request.into_inner()).await?))
    }

    #[tracing::instrument(name = "BeginLogin", skip_all)]
    async fn begin_login(
        &self,
        request: Request<BeginLoginRequest>,
    ) -> Result<Response<BeginLoginResponse>, Status> {
        Ok(Response::new(self.state.begin_login(request.into_inner()).await?))
    }

    #[tracing::instrument(name = "CompleteLogin", skip_all)]
    async fn complete_login(
        &self,
        request: Request<CompleteLoginRequest>,
    ) -> Result<Response<CompleteLoginResponse>, Status> {
        Ok(Response::new(self.state.complete_login(request.into_inner()).await?))
    }

    #[tracing::instrument(name = "RefreshToken", skip_all)]
    async fn refresh_token(
        &self,
        request: Request<RefreshTokenRequest>,
    ) -> Result<Response<RefreshTokenResponse>, Status> {
        Ok(Response::new(self.state.refresh_token(request.into_inner()).await?))
    }

    #[tracing::instrument(name = "Logout", skip_all)]
    async fn logout(&self, request: Request<LogoutRequest>) -> Result<Response<LogoutResponse>, Status> {
        Ok(Response::new(self.state.logout(request.into_inner()).await?))
    }

    #[tracing::instrument(name = "GetJwks", skip_all)]
    async fn get_jwks(&self, _request: Request<GetJwksRequest>) -> Result<Response<GetJwksResponse>, Status> {
        Ok(Response::new(self.state.get_jwks().await?))
    }
}
