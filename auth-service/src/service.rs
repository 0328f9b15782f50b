//! The AuthService gRPC API: validate → store → map.

use chrono::{DateTime, Duration, Utc};
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family},
};
use storegate::{
    ApiError,
    pb::auth::v1::{
        BeginLoginRequest, BeginLoginResponse, ChangePasswordRequest, ChangePasswordResponse,
        CompleteLoginRequest, CompleteLoginResponse, GetJwksRequest, GetJwksResponse, LogoutRequest,
        LogoutResponse, RefreshTokenRequest, RefreshTokenResponse, RegisterRequest, RegisterResponse,
        ResetTotpRequest, ResetTotpResponse, RevokeSessionsRequest, RevokeSessionsResponse, TotpEnrollment,
        auth_service_server::AuthService,
    },
    token::{ACCESS_TOKEN_TTL_SECS, Claims},
};
use tonic::{Request, Response, Status};

use crate::{
    audit::{self, Actor, Entry, Event},
    client::Client,
    config::LoginPolicy,
    crypto::{MasterKey, random_bytes, random_token, token_hash},
    domain::{Username, check_new_password, password_length_ok},
    keys::SigningKeys,
    password::{PasswordHasher, Place},
    recovery,
    refusal::{LoginError, Refusal},
    store::{
        Admission, AuthStore, CompletingLogin, Completion, DEVICE_TOKEN_TTL_DAYS, LoginAction, NewDevice,
        NewRefreshToken, NewTicket, Rotation, SecondFactor, Ticket,
    },
    throttle::{self, Attempt, Caller, Step},
    totp,
};

/// How long a login ticket may wait for its code.
pub const TICKET_TTL_SECS: i64 = 5 * 60;

const BAD_REFRESH_TOKEN: &str = "refresh token is invalid, expired or revoked; log in again";
const STILL_ENROLLING: &str =
    "the account has no confirmed second factor yet: complete the login with this ticket first";
const NOT_A_RECOVERY_CODE: &str = "a recovery code looks like ABCD-EFGH-JKLM";
/// Longest ticket or code we bother hashing; anything longer is not ours.
const MAX_OPAQUE_LEN: usize = 256;

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
    pub policy: LoginPolicy,
    /// Login steps by outcome, for the metrics endpoint.
    pub login_attempts: Family<LoginLabels, Counter>,
    /// Account-wide locks: an account's count of failures from
    /// unrecognised clients reached `MAX_FAILED_LOGINS`.
    pub accounts_locked: Counter,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LoginLabels {
    step: &'static str,
    outcome: &'static str,
}

/// The steps counted in `storegate_login_attempts_total`, and their outcomes.
const LOGIN_STEPS: [&str; 4] = ["begin", "complete", "change_password", "reset_totp"];
const LOGIN_OUTCOMES: [&str; 6] = ["ok", "rejected", "disabled", "throttled", "busy", "error"];

/// The login counters with every step's and outcome's series at 0, so that
/// Prometheus's rate() and increase() see the first event of each.
pub fn login_attempts_from_zero() -> Family<LoginLabels, Counter> {
    let family = Family::<LoginLabels, Counter>::default();
    for step in LOGIN_STEPS {
        for outcome in LOGIN_OUTCOMES {
            drop(family.get_or_create(&LoginLabels { step, outcome }));
        }
    }
    family
}

impl AuthState {
    /// Counts a login step by its outcome, and turns it into the answer.
    fn count_login<T>(&self, step: &'static str, outcome: Result<T, LoginError>) -> Result<T, ApiError> {
        let counted = outcome.as_ref().map_or_else(LoginError::outcome_label, |_| "ok");
        self.login_attempts.get_or_create(&LoginLabels { step, outcome: counted }).inc();
        outcome.map_err(ApiError::from)
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

/// The associated data of a rotated refresh token's sealed successor: the
/// old token's hash, so that a sealed successor moved to another row does
/// not open.
fn successor_seal_context(old_hash: &[u8]) -> String {
    let hex: String = old_hash.iter().map(|b| format!("{b:02x}")).collect();
    format!("refresh_successor:{hex}")
}

/// What a ticket and a code are traded for.
enum Intent {
    SignIn,
    ChangePassword { password_hash: String },
    ResetTotp,
}

/// A completed last step: what its answer carries besides the access token.
struct Completed {
    user_id: i64,
    username: String,
    /// None when the step started no session (ResetTotp).
    refresh_token: Option<String>,
    /// The client's new device token; None with no session (ResetTotp).
    device_token: Option<String>,
    /// Only on the call that confirmed the enrollment.
    recovery_codes: Vec<String>,
    /// This call confirmed the enrollment.
    enrolled: bool,
    used_recovery_code: bool,
}

impl AuthState {
    fn open_totp_secret(&self, user_id: i64, sealed: &[u8]) -> Result<Vec<u8>, ApiError> {
        self.master_key.decrypt(sealed, &totp_seal_context(user_id)).map_err(|e| {
            ApiError::Internal(anyhow::Error::new(e).context(format!("TOTP secret of user {user_id}")))
        })
    }

    fn refresh_ttl(&self) -> Duration {
        Duration::seconds(i64::from(self.policy.refresh_token_ttl_secs))
    }

    async fn register(&self, req: RegisterRequest, client: Client) -> Result<RegisterResponse, ApiError> {
        let username = Username::parse(&req.username);
        // The guessability check is CPU work too: off the runtime, bounded
        // like hashing.
        let (password, raw_username) = (req.password.clone(), req.username.clone());
        let password = self.hasher.run(client, move || check_new_password(&password, &raw_username)).await?;
        ApiError::check([username.clone().err(), password.err()].into_iter().flatten().collect())?;
        let username = username.map_err(|v| ApiError::InvalidArgument(vec![v]))?;

        // Every attempt that reaches the database counts, a taken name too:
        // Register must not be a free way to learn which names exist.
        let limit = i64::from(self.policy.registrations_per_client_per_hour);
        let quota = (limit > 0).then(|| throttle::registration_subject(client));
        if let Some(subject) = &quota {
            let now = storegate::db::now().timestamp();
            if let Admission::RefusedUntil(until) = self.store.admit_quota(subject, limit, now).await? {
                return Err(ApiError::ResourceExhausted {
                    message: throttle::REGISTRATIONS_THROTTLED,
                    retry_after: Some(std::time::Duration::from_secs((until - now).max(1) as u64)),
                });
            }
        }
        let created = async {
            let password_hash = self.hasher.hash(client, req.password).await?;
            self.store.create_user(username.as_str(), &password_hash, storegate::db::now()).await
        }
        .await;
        if let Some(subject) = &quota
            && !matches!(created, Ok(_) | Err(ApiError::AlreadyExists(_)))
            && let Err(e) = self.store.refund_quota(subject).await
        {
            tracing::warn!(error = %e, "cannot give back a registration that did not happen");
        }
        let user_id = created?;
        tracing::info!(user_id, "registered a user");
        let entry = Entry::new(Event::Registered, Actor::Owner).account(user_id, username.as_str());
        audit::record(&self.store, entry.client(client)).await;
        Ok(RegisterResponse { user_id })
    }

    async fn begin_login(
        &self,
        req: BeginLoginRequest,
        client: Client,
    ) -> Result<BeginLoginResponse, ApiError> {
        // Refused before any hashing or counting: it says nothing about the account.
        if !password_length_ok(&req.password) || req.username.len() > MAX_OPAQUE_LEN {
            return Err(Refusal::BadCredentials.into());
        }
        let now = storegate::db::now();
        let outcome = async {
            // A place in the hashing queue first (this client's fair share):
            // a call refused as busy has counted and written nothing.
            let place = self.hasher.place(client)?;
            let device = self.recognised_device(&req.username, &req.device_token, now).await?;
            let caller = Caller { client, device: device.as_deref() };
            let attempt = throttle::admit(
                &self.store,
                &self.policy,
                &req.username,
                caller,
                Step::Password,
                now.timestamp(),
            )
            .await?;
            let mut account = None;
            let outcome =
                self.check_password_and_issue_ticket(req, place, &attempt, caller, now, &mut account).await;
            // A ticket is the outcome's last step, stored in the transaction
            // that gives the attempt back: an Ok has settled it.
            if attempt.settle(&outcome).await
                && let Some((user_id, username)) = account
            {
                self.account_locked(user_id, &username, client).await;
            }
            outcome
        }
        .await;
        self.count_login("begin", outcome)
    }

    /// The hash of `device_token` when it is a live device token of the
    /// account named `username`.
    async fn recognised_device(
        &self,
        username: &str,
        device_token: &str,
        now: DateTime<Utc>,
    ) -> Result<Option<Vec<u8>>, ApiError> {
        if device_token.is_empty() || device_token.len() > MAX_OPAQUE_LEN {
            return Ok(None);
        }
        let Ok(username) = Username::parse(username) else { return Ok(None) };
        let hash = token_hash(device_token);
        Ok(self.store.recognised_device(&hash, username.as_str(), now).await?.then_some(hash))
    }

    /// The password step in its hashing `place`, once `attempt` is
    /// admitted; `account` says whose account the name is, once known.
    async fn check_password_and_issue_ticket(
        &self,
        req: BeginLoginRequest,
        place: Place,
        attempt: &Attempt,
        caller: Caller<'_>,
        now: DateTime<Utc>,
        account: &mut Option<(i64, String)>,
    ) -> Result<BeginLoginResponse, LoginError> {
        let client = caller.client;
        let user = match Username::parse(&req.username) {
            Ok(name) => self.store.find_login_user(name.as_str()).await?,
            Err(_) => None,
        };
        // Unknown users are checked against a dummy hash: same answer, same time.
        let (stored_hash, user) = match user {
            Some(u) => (Some(u.password_hash), Some((u.id, u.disabled_at, u.totp))),
            None => (None, None),
        };
        let password_ok = self.hasher.verify_in(place, req.password, stored_hash).await?;
        let Some((user_id, disabled_at, totp_state)) = user else {
            // The name is not stored: it may be a password typed in the
            // wrong field.
            let entry = Entry::new(Event::PasswordRejected, Actor::Anonymous).detail("unknown user");
            audit::record(&self.store, entry.client(client)).await;
            return Err(Refusal::BadCredentials.into());
        };
        *account = Some((user_id, totp_state.username.clone()));
        let entry =
            |event, actor| Entry::new(event, actor).account(user_id, &totp_state.username).client(client);
        if !password_ok {
            audit::record(&self.store, entry(Event::PasswordRejected, Actor::Anonymous)).await;
            return Err(Refusal::BadCredentials.into());
        }
        // Said only to whoever knows the password.
        if disabled_at.is_some() {
            audit::record(&self.store, entry(Event::LoginRefusedDisabled, Actor::Owner)).await;
            return Err(Refusal::Disabled.into());
        }

        // Until a code confirms one, every ticket offers a secret of its
        // own: only the secret of the ticket that completes is kept, and a
        // secret once shown dies with its ticket. An account still
        // enrolling is read again: another login may have confirmed it
        // during the hash.
        let confirmed = match totp_state.totp_confirmed_at {
            Some(_) => true,
            None => self.store.totp_confirmed(user_id).await?,
        };
        let (enrollment, sealed_secret) = if confirmed {
            (None, None)
        } else {
            let secret = totp::new_secret();
            let sealed = self.master_key.encrypt(&secret, &totp_seal_context(user_id))?;
            let e = totp::enrollment(&secret, &self.totp_issuer, &totp_state.username)?;
            let enrollment =
                TotpEnrollment { otpauth_uri: e.otpauth_uri, qr_png: e.qr_png, secret: e.secret_base32 };
            (Some(enrollment), Some(sealed))
        };
        // Last, so that nothing can fail once the ticket is stored and the
        // attempt given back.
        let ticket = random_token();
        let expires_at = now + Duration::seconds(TICKET_TTL_SECS);
        let new_ticket = NewTicket {
            ticket_hash: &token_hash(&ticket),
            user_id,
            enrollment_secret: sealed_secret.as_deref(),
            device_hash: caller.device,
            expires_at,
        };
        let given_back: Vec<&[u8]> = attempt.pair().into_iter().collect();
        self.store.create_ticket(&new_ticket, &given_back, now).await?;
        tracing::info!(
            user_id,
            enrolling = enrollment.is_some(),
            known_device = caller.device.is_some(),
            "password accepted; ticket issued"
        );
        audit::record(&self.store, entry(Event::PasswordAccepted, Actor::Owner)).await;
        Ok(BeginLoginResponse {
            login_ticket: ticket,
            ticket_expire_time: Some(prost_types::Timestamp { seconds: expires_at.timestamp(), nanos: 0 }),
            enrollment,
        })
    }

    /// This failure brought the account's count of failures from
    /// unrecognised clients to `MAX_FAILED_LOGINS`: from now on each further
    /// one locks it to them for `ACCOUNT_LOCK_SECS`. Counted, logged and
    /// audited; the account's known devices still log in.
    async fn account_locked(&self, user_id: i64, username: &str, client: Client) {
        let (failures, lock_secs) = (self.policy.max_failed_logins, self.policy.account_lock_secs);
        self.accounts_locked.inc();
        tracing::warn!(
            user_id,
            failures,
            lock_secs,
            "account locked after consecutive failed logins from unrecognised clients; its known devices \
             still log in; `auth-service unlock-user` lifts it"
        );
        let entry = Entry::new(Event::AccountLocked, Actor::System).account(user_id, username).client(client);
        let detail = format!(
            "{failures} failed or unfinished logins from unrecognised clients; each further one locks it for {lock_secs} s"
        );
        audit::record(&self.store, entry.detail(detail)).await;
    }

    async fn complete_login(
        &self,
        req: CompleteLoginRequest,
        client: Client,
    ) -> Result<CompleteLoginResponse, ApiError> {
        let outcome = async {
            let completed = self.complete(&req.login_ticket, &req.code, client, Intent::SignIn).await?;
            let access_token = self.issue_access_token(completed.user_id, &completed.username).await?;
            Ok(CompleteLoginResponse {
                access_token,
                refresh_token: completed.refresh_token.unwrap_or_default(),
                token_type: "Bearer".to_owned(),
                expires_in: ACCESS_TOKEN_TTL_SECS,
                recovery_codes: completed.recovery_codes,
                device_token: completed.device_token.unwrap_or_default(),
            })
        }
        .await;
        self.count_login("complete", outcome)
    }

    async fn change_password(
        &self,
        req: ChangePasswordRequest,
        client: Client,
    ) -> Result<ChangePasswordResponse, ApiError> {
        let outcome = async {
            let ticket = self.ticket(&req.login_ticket).await?;
            let username = ticket.totp.username.clone();
            let new_password = req.new_password.clone();
            let checked =
                self.hasher.run(client, move || check_new_password(&new_password, &username)).await?;
            checked.map_err(|v| ApiError::invalid("new_password", v.description))?;
            let password_hash = self.hasher.hash(client, req.new_password).await?;
            let completed = self
                .complete(&req.login_ticket, &req.code, client, Intent::ChangePassword { password_hash })
                .await?;
            tracing::info!(user_id = completed.user_id, "password changed; other sessions ended");
            let access_token = self.issue_access_token(completed.user_id, &completed.username).await?;
            Ok(ChangePasswordResponse {
                access_token,
                refresh_token: completed.refresh_token.unwrap_or_default(),
                token_type: "Bearer".to_owned(),
                expires_in: ACCESS_TOKEN_TTL_SECS,
                device_token: completed.device_token.unwrap_or_default(),
            })
        }
        .await;
        self.count_login("change_password", outcome)
    }

    async fn reset_totp(&self, req: ResetTotpRequest, client: Client) -> Result<ResetTotpResponse, ApiError> {
        let outcome = async {
            if recovery::normalise(&req.recovery_code).is_none() {
                return Err(ApiError::invalid("recovery_code", NOT_A_RECOVERY_CODE).into());
            }
            let completed =
                self.complete(&req.login_ticket, &req.recovery_code, client, Intent::ResetTotp).await?;
            tracing::info!(
                user_id = completed.user_id,
                "second factor reset with a recovery code; sessions ended"
            );
            Ok(ResetTotpResponse {})
        }
        .await;
        self.count_login("reset_totp", outcome)
    }

    /// A live ticket, or [`Refusal::BadTicket`].
    async fn ticket(&self, login_ticket: &str) -> Result<Ticket, LoginError> {
        if login_ticket.is_empty() || login_ticket.len() > MAX_OPAQUE_LEN {
            return Err(Refusal::BadTicket.into());
        }
        let ticket = self.store.live_ticket(&token_hash(login_ticket), storegate::db::now()).await?;
        Ok(ticket.ok_or(Refusal::BadTicket)?)
    }

    /// The last step shared by CompleteLogin, ChangePassword and ResetTotp:
    /// the ticket and the code, counted on the ticket, throttled and
    /// counted like a password, then what `intent` asks, all in one
    /// transaction.
    async fn complete(
        &self,
        login_ticket: &str,
        code: &str,
        client: Client,
        intent: Intent,
    ) -> Result<Completed, LoginError> {
        let now = storegate::db::now();
        let ticket = self.ticket(login_ticket).await?;
        let ticket_hash = token_hash(login_ticket);
        let username = &ticket.totp.username;
        let entry = |event, actor| Entry::new(event, actor).account(ticket.user_id, username).client(client);
        if ticket.disabled_at.is_some() {
            audit::record(&self.store, entry(Event::LoginRefusedDisabled, Actor::Owner)).await;
            return Err(Refusal::Disabled.into());
        }
        let enrolling = ticket.enrollment_secret.is_some();
        if enrolling && !matches!(intent, Intent::SignIn) {
            return Err(ApiError::FailedPrecondition(STILL_ENROLLING.to_owned()).into());
        }
        // A ticket issued before a reset offers no secret, yet the account
        // has none confirmed: it belongs to a login that no longer exists.
        if !enrolling && ticket.totp.totp_confirmed_at.is_none() {
            return Err(Refusal::BadTicket.into());
        }

        // Counted on the ticket before anything else, in one conditional
        // UPDATE: of any number of parallel attempts, at most
        // MAX_WRONG_CODES_PER_TICKET are evaluated.
        let Some(which) = self.store.count_code_attempt(&ticket_hash, now).await? else {
            return Err(Refusal::BadTicket.into());
        };
        // Wrong codes count against the account's name as wrong passwords do,
        // so a known password cannot buy unlimited code guesses; the client
        // is the device the ticket's BeginLogin was recognised by, if any.
        // The ticket's first code uses the account count the ticket
        // carries (see `throttle.rs`).
        let caller = Caller { client, device: ticket.device_hash.as_deref() };
        let step = Step::Code(which);
        let attempt =
            match throttle::admit(&self.store, &self.policy, username, caller, step, now.timestamp()).await {
                Ok(attempt) => attempt,
                Err(refused) => {
                    self.refund_code_attempt(&ticket_hash).await;
                    return Err(refused);
                }
            };
        // A completed login clears the account's count too, from any
        // client: it proves the owner.
        let account_subject = throttle::account_subject(username);
        let cleared: Vec<&[u8]> = attempt.pair().into_iter().chain([account_subject.as_slice()]).collect();
        let login = CompletingLogin {
            ticket_hash: &ticket_hash,
            user_id: ticket.user_id,
            throttle_subjects: &cleared,
            device_hash: caller.device,
        };
        let succeeded = match &intent {
            Intent::SignIn => Event::LoginCompleted,
            Intent::ChangePassword { .. } => Event::PasswordChanged,
            Intent::ResetTotp => Event::TotpReset,
        };
        let completed = self.check_code_and_complete(code, &login, &ticket, intent, now).await;
        // Settled by what the transaction did: once it committed (and
        // cleared the count), a failure to sign the token is no attempt's
        // outcome and must not refund a count added since.
        let locked_account = attempt.settle(&completed).await;
        let wrong = matches!(&completed, Err(LoginError::Refused(refusal)) if refusal.is_wrong_credential());
        if completed.is_err() && !wrong {
            // Never evaluated (or its ticket died meanwhile): the ticket's
            // count goes back too.
            self.refund_code_attempt(&ticket_hash).await;
        }
        match &completed {
            Ok(done) => {
                let how = match (done.enrolled, done.used_recovery_code) {
                    (true, _) => Some("enrolled a second factor"),
                    (false, true) => Some("with a recovery code"),
                    (false, false) => None,
                };
                let entry = entry(succeeded, Actor::Owner);
                audit::record(&self.store, if let Some(how) = how { entry.detail(how) } else { entry }).await;
            }
            Err(LoginError::Refused(Refusal::BadCode)) => {
                audit::record(&self.store, entry(Event::CodeRejected, Actor::Anonymous)).await;
            }
            Err(_) => {}
        }
        if locked_account {
            self.account_locked(ticket.user_id, username, client).await;
        }
        completed
    }

    async fn refund_code_attempt(&self, ticket_hash: &[u8]) {
        if let Err(e) = self.store.refund_code_attempt(ticket_hash).await {
            // The ticket still dies at expiry; one attempt fewer is left.
            tracing::warn!(error = %e, "cannot give back a code attempt to its ticket");
        }
    }

    /// Checks the code and completes in one transaction (see
    /// `AuthStore::complete_login`).
    async fn check_code_and_complete(
        &self,
        code: &str,
        login: &CompletingLogin<'_>,
        ticket: &Ticket,
        intent: Intent,
        now: DateTime<Utc>,
    ) -> Result<Completed, LoginError> {
        let user_id = login.user_id;
        let totp_state = &ticket.totp;
        let now_step = totp::step_at(u64::try_from(now.timestamp()).unwrap_or(0));
        let factor = match (&ticket.enrollment_secret, recovery::normalise(code)) {
            // Enrolling: only a code of this ticket's own secret.
            (Some(sealed), _) => {
                let secret = self.open_totp_secret(user_id, sealed)?;
                let step = totp::matching_step(&secret, code, now_step, totp_state.totp_last_step)
                    .ok_or(Refusal::BadCode)?;
                SecondFactor::TotpStep(step)
            }
            (None, Some(recovery_code)) => {
                SecondFactor::RecoveryCode(recovery::hash(&self.master_key, &recovery_code))
            }
            (None, None) if matches!(intent, Intent::ResetTotp) => {
                return Err(ApiError::invalid("recovery_code", NOT_A_RECOVERY_CODE).into());
            }
            (None, None) => {
                let secret = self.open_totp_secret(user_id, &totp_state.totp_secret)?;
                let step = totp::matching_step(&secret, code, now_step, totp_state.totp_last_step)
                    .ok_or(Refusal::BadCode)?;
                SecondFactor::TotpStep(step)
            }
        };
        // The call that confirms enrollment hands out the recovery codes.
        let recovery_codes =
            if ticket.enrollment_secret.is_some() { recovery::generate() } else { Vec::new() };
        let recovery_hashes: Vec<Vec<u8>> = recovery_codes
            .iter()
            .filter_map(|c| recovery::normalise(c))
            .map(|c| recovery::hash(&self.master_key, &c))
            .collect();
        let action = match (&intent, &ticket.enrollment_secret) {
            (_, Some(sealed_secret)) => {
                LoginAction::Enroll { sealed_secret, recovery_codes: &recovery_hashes }
            }
            (Intent::SignIn, None) => LoginAction::SignIn,
            (Intent::ChangePassword { password_hash }, None) => LoginAction::ChangePassword { password_hash },
            (Intent::ResetTotp, None) => LoginAction::ResetTotp,
        };

        let refresh_token = random_token();
        let session_expires_at = now + Duration::seconds(i64::from(self.policy.session_max_lifetime_secs));
        let refresh = NewRefreshToken {
            token_hash: token_hash(&refresh_token),
            family: random_bytes::<16>().to_vec(),
            expires_at: (now + self.refresh_ttl()).min(session_expires_at),
            session_expires_at,
        };
        // A login that starts a session makes this client a known device.
        let device_token = (!matches!(action, LoginAction::ResetTotp)).then(random_token);
        let device = device_token.as_deref().map(|token| NewDevice {
            token_hash: token_hash(token),
            expires_at: now + Duration::days(DEVICE_TOKEN_TTL_DAYS),
        });
        match self.store.complete_login(login, &factor, &action, &refresh, device.as_ref(), now).await? {
            Completion::Completed => {}
            Completion::TicketInvalid => return Err(Refusal::BadTicket.into()),
            Completion::FactorSpent => return Err(Refusal::BadCode.into()),
            Completion::EnrollmentTaken => return Err(Refusal::EnrollmentTaken.into()),
        }

        let used_recovery_code = matches!(factor, SecondFactor::RecoveryCode(_));
        let confirmed_enrollment = matches!(action, LoginAction::Enroll { .. });
        tracing::info!(user_id, confirmed_enrollment, used_recovery_code, "login completed");
        Ok(Completed {
            user_id,
            username: totp_state.username.clone(),
            refresh_token: (!matches!(action, LoginAction::ResetTotp)).then_some(refresh_token),
            device_token,
            recovery_codes,
            enrolled: confirmed_enrollment,
            used_recovery_code,
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
            client_id: None,
            azp: None,
        };
        Ok(self.keys.sign(&claims).await?)
    }

    async fn refresh_token(
        &self,
        req: RefreshTokenRequest,
        client: Client,
    ) -> Result<RefreshTokenResponse, ApiError> {
        if req.refresh_token.is_empty() || req.refresh_token.len() > MAX_OPAQUE_LEN {
            return Err(ApiError::Unauthenticated(BAD_REFRESH_TOKEN));
        }
        let now = storegate::db::now();
        let old_hash = token_hash(&req.refresh_token);
        let grace = Duration::seconds(i64::from(self.policy.refresh_reuse_grace_secs));
        let refresh_token = random_token();
        // Kept on the old token for the grace only, sealed to it.
        let sealed = match grace > Duration::zero() {
            true => {
                Some(self.master_key.encrypt(refresh_token.as_bytes(), &successor_seal_context(&old_hash))?)
            }
            false => None,
        };
        let rotation = self
            .store
            .rotate_refresh_token(
                &old_hash,
                &token_hash(&refresh_token),
                sealed.as_deref(),
                self.refresh_ttl(),
                grace,
                now,
            )
            .await?;
        let (user_id, refresh_token) = match rotation {
            Rotation::Rotated { user_id } => (user_id, refresh_token),
            Rotation::Again { user_id, successor_sealed } => {
                match self.unused_successor(&old_hash, &successor_sealed, now).await? {
                    Some(successor) => {
                        tracing::info!(user_id, "a refresh token redeemed again within its reuse grace");
                        // Audited with the address: a replay within the
                        // grace shows here, beside the owner's refresh.
                        let entry = Entry::new(Event::RefreshTokenRedeemedAgain, Actor::Owner)
                            .user(user_id)
                            .client(client);
                        audit::record(&self.store, entry.detail("answered with the same successor")).await;
                        (user_id, successor)
                    }
                    // Its successor was rotated in turn: whoever holds the
                    // old token now holds a copy.
                    None => {
                        self.store.revoke_refresh_family(&old_hash, now).await?;
                        return Err(self.refresh_token_reused(user_id, client).await);
                    }
                }
            }
            Rotation::Reused { user_id } => return Err(self.refresh_token_reused(user_id, client).await),
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

    /// The successor sealed on a rotated token, if it still may be
    /// redeemed (live, not rotated in turn).
    async fn unused_successor(
        &self,
        old_hash: &[u8],
        sealed: &[u8],
        now: DateTime<Utc>,
    ) -> Result<Option<String>, ApiError> {
        let opened = self.master_key.decrypt(sealed, &successor_seal_context(old_hash)).map_err(|e| {
            ApiError::Internal(anyhow::Error::new(e).context("the sealed successor of a refresh token"))
        })?;
        let successor = String::from_utf8(opened)
            .map_err(|e| ApiError::Internal(anyhow::Error::new(e).context("a sealed refresh token")))?;
        Ok(self.store.session(&token_hash(&successor), now).await?.map(|_| successor))
    }

    /// A rotated refresh token came back after its grace: its session is
    /// revoked (by the store); logged, audited, and answered.
    async fn refresh_token_reused(&self, user_id: i64, client: Client) -> ApiError {
        tracing::warn!(user_id, "a rotated refresh token was presented again; its login is revoked");
        let entry = Entry::new(Event::RefreshTokenReused, Actor::Anonymous).user(user_id).client(client);
        audit::record(&self.store, entry.detail("the session it belongs to ended")).await;
        ApiError::Unauthenticated(BAD_REFRESH_TOKEN)
    }

    async fn logout(&self, req: LogoutRequest, client: Client) -> Result<LogoutResponse, ApiError> {
        // Like RFC 7009: an unknown token is not an error, there is nothing
        // to revoke and nothing to tell.
        if !req.refresh_token.is_empty() && req.refresh_token.len() <= MAX_OPAQUE_LEN {
            let ended = self
                .store
                .revoke_refresh_family(&token_hash(&req.refresh_token), storegate::db::now())
                .await?;
            tracing::info!(revoked = ended.is_some(), "logout");
            if let Some(user_id) = ended {
                let entry = Entry::new(Event::SessionsRevoked, Actor::Owner)
                    .user(user_id)
                    .detail("logout")
                    .client(client);
                audit::record(&self.store, entry).await;
            }
        }
        Ok(LogoutResponse {})
    }

    async fn revoke_sessions(
        &self,
        req: RevokeSessionsRequest,
        client: Client,
    ) -> Result<RevokeSessionsResponse, ApiError> {
        if req.refresh_token.is_empty() || req.refresh_token.len() > MAX_OPAQUE_LEN {
            return Err(ApiError::Unauthenticated(BAD_REFRESH_TOKEN));
        }
        let now = storegate::db::now();
        let session = self
            .store
            .session(&token_hash(&req.refresh_token), now)
            .await?
            .ok_or(ApiError::Unauthenticated(BAD_REFRESH_TOKEN))?;
        let keep = req.keep_current.then_some(session.family.as_slice());
        let revoked_sessions = self.store.revoke_user_sessions(session.user_id, keep, now).await?;
        tracing::info!(
            user_id = session.user_id,
            revoked_sessions,
            kept_current = req.keep_current,
            "sessions revoked"
        );
        let detail = format!(
            "{revoked_sessions} session(s){}",
            if req.keep_current { ", the current one kept" } else { "" }
        );
        let entry = Entry::new(Event::SessionsRevoked, Actor::Owner)
            .user(session.user_id)
            .detail(detail)
            .client(client);
        audit::record(&self.store, entry).await;
        Ok(RevokeSessionsResponse { revoked_sessions })
    }

    async fn get_jwks(&self) -> Result<GetJwksResponse, ApiError> {
        Ok(GetJwksResponse { jwks_json: self.keys.jwks_json().await?.to_string() })
    }
}

impl AuthApi {
    fn client<T>(&self, request: &Request<T>) -> Client {
        Client::of(request, &self.state.policy.trusted_proxies)
    }
}

#[tonic::async_trait]
impl AuthService for AuthApi {
    #[tracing::instrument(name = "Register", skip_all)]
    async fn register(
        &self,
        request: Request<RegisterRequest>,
    ) -> Result<Response<RegisterResponse>, Status> {
        let client = self.client(&request);
        Ok(Response::new(self.state.register(request.into_inner(), client).await?))
    }

    #[tracing::instrument(name = "BeginLogin", skip_all)]
    async fn begin_login(
        &self,
        request: Request<BeginLoginRequest>,
    ) -> Result<Response<BeginLoginResponse>, Status> {
        let client = self.client(&request);
        Ok(Response::new(self.state.begin_login(request.into_inner(), client).await?))
    }

    #[tracing::instrument(name = "CompleteLogin", skip_all)]
    async fn complete_login(
        &self,
        request: Request<CompleteLoginRequest>,
    ) -> Result<Response<CompleteLoginResponse>, Status> {
        let client = self.client(&request);
        Ok(Response::new(self.state.complete_login(request.into_inner(), client).await?))
    }

    #[tracing::instrument(name = "RefreshToken", skip_all)]
    async fn refresh_token(
        &self,
        request: Request<RefreshTokenRequest>,
    ) -> Result<Response<RefreshTokenResponse>, Status> {
        let client = self.client(&request);
        Ok(Response::new(self.state.refresh_token(request.into_inner(), client).await?))
    }

    #[tracing::instrument(name = "Logout", skip_all)]
    async fn logout(&self, request: Request<LogoutRequest>) -> Result<Response<LogoutResponse>, Status> {
        let client = self.client(&request);
        Ok(Response::new(self.state.logout(request.into_inner(), client).await?))
    }

    #[tracing::instrument(name = "GetJwks", skip_all)]
    async fn get_jwks(&self, _request: Request<GetJwksRequest>) -> Result<Response<GetJwksResponse>, Status> {
        Ok(Response::new(self.state.get_jwks().await?))
    }

    #[tracing::instrument(name = "RevokeSessions", skip_all)]
    async fn revoke_sessions(
        &self,
        request: Request<RevokeSessionsRequest>,
    ) -> Result<Response<RevokeSessionsResponse>, Status> {
        let client = self.client(&request);
        Ok(Response::new(self.state.revoke_sessions(request.into_inner(), client).await?))
    }

    #[tracing::instrument(name = "ChangePassword", skip_all)]
    async fn change_password(
        &self,
        request: Request<ChangePasswordRequest>,
    ) -> Result<Response<ChangePasswordResponse>, Status> {
        let client = self.client(&request);
        Ok(Response::new(self.state.change_password(request.into_inner(), client).await?))
    }

    #[tracing::instrument(name = "ResetTotp", skip_all)]
    async fn reset_totp(
        &self,
        request: Request<ResetTotpRequest>,
    ) -> Result<Response<ResetTotpResponse>, Status> {
        let client = self.client(&request);
        Ok(Response::new(self.state.reset_totp(request.into_inner(), client).await?))
    }
}
