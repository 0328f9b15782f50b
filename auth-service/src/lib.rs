//! auth-service: accounts, argon2id passwords, TOTP two-factor login and the
//! EdDSA access tokens it issues. `main.rs` only parses flags and calls
//! [`run`] or one of the admin commands.

pub mod admin;
pub mod admin_api;
pub mod audit;
pub mod client;
pub mod config;
pub mod crypto;
pub mod domain;
pub mod keys;
pub mod password;
pub mod recovery;
pub mod refusal;
pub mod service;
pub mod service_accounts;
pub mod store;
pub mod throttle;
pub mod token_endpoint;
pub mod totp;
pub mod well_known;

use std::{future::Future, time::Duration};

use anyhow::Context as _;
use storegate::{
    db,
    db_health::DbHealth,
    pb::auth::v1::{admin_service_server::AdminServiceServer, auth_service_server::AuthServiceServer},
    server::{Gate, Started},
};
use tokio::net::TcpListener;

pub use config::AuthConfig;
use crypto::MasterKey;
use keys::SigningKeys;
use password::PasswordHasher;
use service::{AuthApi, AuthState};
use store::AuthStore;

/// Largest request decoded. Far above any legitimate auth call, yet large
/// enough that an oversized password (up to 1 MiB) reaches validation and
/// gets a clear INVALID_ARGUMENT / UNAUTHENTICATED (above this, the server answers
/// RESOURCE_EXHAUSTED before any handler runs).
const MAX_REQUEST_BYTES: usize = 2 * 1024 * 1024;
const SWEEP_INTERVAL: Duration = Duration::from_secs(60);

/// Opens the database (migrating it, or waiting for its schema), the master
/// key and the signing keys.
pub async fn open_state(config: &AuthConfig) -> anyhow::Result<AuthState> {
    // A missing master key fails before anything touches the database.
    let master_key = load_master_key(config)?;
    let store = AuthStore::new(config.common.open_database().await?);
    let keys = SigningKeys::load(store.clone(), master_key.clone()).await?;
    let hasher = tokio::task::spawn_blocking(PasswordHasher::new).await??;
    Ok(AuthState {
        store,
        hasher,
        keys,
        master_key,
        issuer: config.common.jwt_issuer.clone(),
        audience: config.common.jwt_audience.clone(),
        totp_issuer: config.totp_issuer.clone(),
        policy: config.login.clone(),
        login_attempts: service::login_attempts_from_zero(),
        accounts_locked: Default::default(),
    })
}

/// Serves AuthService (with health, reflection and gRPC-Web) on `listener`
/// until `shutdown` completes. The port answers at once; health says
/// SERVING once the database, its schema and the signing keys are there.
pub async fn run(
    config: AuthConfig,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    let metrics = storegate::metrics::Metrics::new("auth-service");
    let api = Gate::default();
    let admin_api = Gate::default();
    let well_known = well_known::WellKnown::default();
    let token_endpoint = token_endpoint::TokenEndpoint::default();
    let (mut routes, health) = storegate::server::base_routes(storegate::pb::AUTH_FILE_DESCRIPTOR_SET)?;
    routes.add_service(api.clone());
    routes.add_service(admin_api.clone());
    tracing::info!(addr = %listener.local_addr()?, "auth-service listening; starting");
    let start = async {
        let state = open_state(&config).await?;
        let db = state.store.db().clone();
        let db_health = DbHealth::watch(&db);
        metrics.register("login_attempts", "Login steps by outcome", state.login_attempts.clone());
        metrics.register(
            "accounts_locked",
            "Account-wide locks: accounts whose consecutive failed logins from unrecognised clients \
             reached MAX_FAILED_LOGINS",
            state.accounts_locked.clone(),
        );
        // What can fail first, so that a failed start leaves no task behind.
        let mut background: Vec<_> =
            storegate::server::spawn_metrics(&metrics, &config.metrics_listen_addr, db.clone())
                .await?
                .into_iter()
                .collect();
        let reuse_grace = chrono::Duration::seconds(i64::from(config.login.refresh_reuse_grace_secs));
        background.push(tokio::spawn(sweep_expired(
            state.store.clone(),
            config.audit_retention_days,
            reuse_grace,
        )));
        let limits = &config.common.limits;
        well_known.open(
            state.keys.clone(),
            state.issuer.clone(),
            config.public_url.clone(),
            config.common.tls_cert_file.is_some(),
        );
        token_endpoint.open(
            state.store.clone(),
            state.keys.clone(),
            state.issuer.clone(),
            state.audience.clone(),
            state.policy.trusted_proxies.clone(),
            state.policy.login_failures_per_client_per_hour,
        );
        let admin = admin_api::AdminApi::new(
            state.store.clone(),
            state.keys.clone(),
            &state.issuer,
            &state.audience,
            state.policy.trusted_proxies.clone(),
        );
        admin_api.open(
            AdminServiceServer::new(admin)
                .max_decoding_message_size(limits.max_request_bytes.unwrap_or(MAX_REQUEST_BYTES))
                .max_encoding_message_size(limits.max_response_bytes),
            db_health.clone(),
        );
        api.open(
            AuthServiceServer::new(AuthApi::new(state))
                .max_decoding_message_size(limits.max_request_bytes.unwrap_or(MAX_REQUEST_BYTES))
                .max_encoding_message_size(limits.max_response_bytes),
            db_health.clone(),
        );
        tracing::info!("auth-service started");
        Ok(Started { db, db_health, also_ready: None, background })
    };
    let name = <AuthServiceServer<AuthApi> as tonic::server::NamedService>::NAME;
    let http = storegate::server::HttpRoutes {
        gets: Some(well_known.http_gets()),
        posts: vec![(token_endpoint::TOKEN_PATH, token_endpoint.http_post())],
    };
    storegate::server::serve(routes, health, name, &metrics, listener, &config.common, start, shutdown, http)
        .await
}

/// Deletes expired tickets, refresh and device tokens now and then (and
/// the sealed successors of refresh tokens past their reuse grace), and
/// audit entries past their retention; correctness never depends on it
/// (every query checks expiry and the grace), only table size.
async fn sweep_expired(store: AuthStore, audit_retention_days: u32, reuse_grace: chrono::Duration) {
    let mut interval = tokio::time::interval(SWEEP_INTERVAL);
    loop {
        interval.tick().await;
        let now = storegate::db::now();
        if let Err(e) = store.sweep_expired(now, reuse_grace).await {
            tracing::warn!(error = %e, "sweeping expired tickets failed");
        }
        if audit_retention_days > 0
            && let Err(e) =
                prune_audit(&store, now - chrono::Duration::days(i64::from(audit_retention_days))).await
        {
            tracing::warn!(error = %e, "pruning the audit trail failed");
        }
    }
}

/// Deletes the audit entries from before `cutoff`, a batch at a time;
/// how many.
pub async fn prune_audit(
    store: &AuthStore,
    cutoff: chrono::DateTime<chrono::Utc>,
) -> Result<u64, storegate::ApiError> {
    const BATCH: i64 = 1000;
    let mut pruned = 0;
    loop {
        let deleted = store.prune_audit(cutoff, BATCH).await?;
        pruned += deleted;
        if deleted < BATCH as u64 {
            if pruned > 0 {
                tracing::info!(pruned, "pruned the audit trail");
            }
            return Ok(pruned);
        }
    }
}

/// The configured master key, or the SQLite development one.
fn load_master_key(config: &AuthConfig) -> anyhow::Result<MasterKey> {
    let url = config.common.expose_database_url();
    let dev_key_dir = if db::is_sqlite_url(url) { db::sqlite_data_dir(url) } else { None };
    if let Some(file) = &config.master_key_file {
        anyhow::ensure!(
            config.master_key.is_none(),
            "both STOREGATE_MASTER_KEY and STOREGATE_MASTER_KEY_FILE are set; set only one"
        );
        return MasterKey::from_file(file);
    }
    MasterKey::load(config.master_key.as_ref(), dev_key_dir.as_deref())
}

/// Opens the store for an admin command (migrating or waiting for the
/// schema, like the server).
pub(crate) async fn admin_store(config: &AuthConfig) -> anyhow::Result<AuthStore> {
    Ok(AuthStore::new(config.common.open_database().await?))
}

/// The operator's view of the accounts, and the account named `username`.
async fn operator_target(
    config: &AuthConfig,
    username: &str,
) -> anyhow::Result<(admin::Accounts, admin::Target)> {
    let accounts = admin::Accounts::new(admin_store(config).await?, audit::Actor::Operator);
    if let Err(v) = domain::Username::parse(username) {
        anyhow::bail!("username {}", v.description);
    }
    let target = accounts
        .find(username)
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?
        .with_context(|| format!("no user named {username}"))?;
    Ok((accounts, target))
}

/// `auth-service grant-role <username> <role>`.
pub async fn grant_role(config: &AuthConfig, username: &str, role: &str) -> anyhow::Result<()> {
    let role = admin::parse_role(role).map_err(anyhow::Error::msg)?;
    let (accounts, target) = operator_target(config, username).await?;
    let granted = accounts.grant_role(&target, role).await.map_err(|e| anyhow::anyhow!("{e}"))?;
    if granted {
        println!("granted role {role} to {}; it is in their next access token", target.username);
    } else {
        println!("{} already has role {role}", target.username);
    }
    accounts.store.db().close().await;
    Ok(())
}

/// `auth-service revoke-role <username> <role>`.
pub async fn revoke_role(config: &AuthConfig, username: &str, role: &str) -> anyhow::Result<()> {
    let role = admin::parse_role(role).map_err(anyhow::Error::msg)?;
    let (accounts, target) = operator_target(config, username).await?;
    match accounts.revoke_role(&target, role, db::now()).await.map_err(|e| anyhow::anyhow!("{e}"))? {
        Some(sessions) => println!(
            "revoked role {role} from {} and ended their {sessions} session(s); access tokens issued \
             before now keep the role until they expire (at most {} minutes)",
            target.username,
            storegate::token::ACCESS_TOKEN_TTL_SECS / 60
        ),
        None => println!("{} did not have role {role}", target.username),
    }
    accounts.store.db().close().await;
    Ok(())
}

/// `auth-service revoke-sessions <username>`: ends every session of a user.
pub async fn revoke_sessions(config: &AuthConfig, username: &str) -> anyhow::Result<i64> {
    let (accounts, target) = operator_target(config, username).await?;
    let sessions = accounts.revoke_sessions(&target, db::now()).await.map_err(|e| anyhow::anyhow!("{e}"))?;
    tracing::info!(user_id = target.user_id, sessions, "an administrator ended every session of a user");
    println!(
        "ended {sessions} session(s) of {}; access tokens already issued expire within {} minutes",
        target.username,
        storegate::token::ACCESS_TOKEN_TTL_SECS / 60
    );
    accounts.store.db().close().await;
    Ok(sessions)
}

/// `auth-service unlock-user <username>`: lifts the account-wide lock
/// (set after MAX_FAILED_LOGINS consecutive failures from unrecognised
/// clients) and forgets those failures; whether a lock was in force.
pub async fn unlock_user(config: &AuthConfig, username: &str) -> anyhow::Result<bool> {
    let (accounts, target) = operator_target(config, username).await?;
    let unlocked = accounts.unlock(&target, db::now()).await.map_err(|e| anyhow::anyhow!("{e}"))?;
    if unlocked {
        tracing::info!(user_id = target.user_id, "an administrator unlocked an account");
        println!("unlocked {}; their failed logins are forgotten", target.username);
    } else {
        println!("{} is not locked; their failed logins are forgotten", target.username);
    }
    accounts.store.db().close().await;
    Ok(unlocked)
}

/// One account in an operator's words: a line of `list-users`, or the
/// lines of `show-user`.
fn describe(account: &store::Account, long: bool) -> String {
    let when = |t: &Option<chrono::DateTime<chrono::Utc>>| {
        t.map_or("never".to_owned(), |t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
    };
    let mut state = Vec::new();
    if account.disabled_at.is_some() {
        state.push("disabled");
    }
    if account.lock.is_some() {
        state.push("locked");
    }
    if account.totp_confirmed_at.is_none() {
        state.push("enrolling");
    }
    let state = if state.is_empty() { "active".to_owned() } else { state.join(", ") };
    let roles = if account.roles.is_empty() { "-".to_owned() } else { account.roles.join(",") };
    if !long {
        return format!(
            "{:<24} {:<20} {:<12} {:>8}  {}",
            account.username,
            state,
            roles,
            account.sessions,
            when(&account.last_login_at)
        );
    }
    format!(
        "username:    {}\nid:          {}\nstate:       {state}\nroles:       {roles}\n\
         enrolled:    {}\ncreated:     {}\nlast login:  {}\nsessions:    {} live\n\
         locked:      {}\ndisabled:    {}",
        account.username,
        account.id,
        account.totp_confirmed_at.map_or("no (the next login enrolls)".to_owned(), |_| format!(
            "yes, since {}",
            when(&account.totp_confirmed_at)
        )),
        when(&Some(account.created_at)),
        when(&account.last_login_at),
        account.sessions,
        account.lock.map_or("no".to_owned(), |lock| format!(
            "to unknown clients, since {} until {}",
            when(&Some(lock.since)),
            when(&chrono::DateTime::from_timestamp(lock.until, 0))
        )),
        account.disabled_at.map_or("no".to_owned(), |_| format!("since {}", when(&account.disabled_at))),
    )
}

/// `auth-service list-users`: every account, its state, roles, live
/// sessions and last login.
pub async fn list_users(config: &AuthConfig) -> anyhow::Result<Vec<store::Account>> {
    let store = admin_store(config).await?;
    let accounts = store.accounts(db::now()).await.map_err(|e| anyhow::anyhow!("{e}"))?;
    println!("{:<24} {:<20} {:<12} {:>8}  last login", "username", "state", "roles", "sessions");
    for account in &accounts {
        println!("{}", describe(account, false));
    }
    store.db().close().await;
    Ok(accounts)
}

/// `auth-service show-user <username>`.
pub async fn show_user(config: &AuthConfig, username: &str) -> anyhow::Result<store::Account> {
    let (accounts, target) = operator_target(config, username).await?;
    let account = accounts
        .account(&target, db::now())
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?
        .with_context(|| format!("no user named {}", target.username))?;
    println!("{}", describe(&account, true));
    accounts.store.db().close().await;
    Ok(account)
}

/// `auth-service disable-user <username>` (or `enable-user`): a disabled
/// account cannot log in or refresh, and its sessions end at once. True
/// when it changed.
pub async fn set_user_disabled(config: &AuthConfig, username: &str, disabled: bool) -> anyhow::Result<bool> {
    let (accounts, target) = operator_target(config, username).await?;
    let changed =
        accounts.set_disabled(&target, disabled, db::now()).await.map_err(|e| anyhow::anyhow!("{e}"))?;
    let (user_id, name) = (target.user_id, &target.username);
    match (disabled, changed) {
        (true, true) => {
            tracing::warn!(user_id, "an administrator disabled an account");
            println!(
                "disabled {name}: no login or refresh until enable-user; their sessions ended, and access \
                 tokens already issued expire within {} minutes",
                storegate::token::ACCESS_TOKEN_TTL_SECS / 60
            );
        }
        (true, false) => println!("{name} is disabled already"),
        (false, true) => {
            tracing::info!(user_id, "an administrator enabled an account");
            println!("enabled {name}: they can log in again");
        }
        (false, false) => println!("{name} is not disabled"),
    }
    accounts.store.db().close().await;
    Ok(changed)
}

/// `auth-service delete-user <username>`: the account, its roles, tickets,
/// sessions and recovery codes; products keep its id as their author.
pub async fn delete_user(config: &AuthConfig, username: &str) -> anyhow::Result<()> {
    let (accounts, target) = operator_target(config, username).await?;
    let deleted = accounts.delete(&target).await.map_err(|e| anyhow::anyhow!("{e}"))?;
    anyhow::ensure!(deleted, "no user named {}", target.username);
    tracing::warn!(user_id = target.user_id, "an administrator deleted an account");
    println!(
        "deleted {} (id {}): their sessions ended, access tokens already issued expire within {} \
         minutes; products they wrote keep the id",
        target.username,
        target.user_id,
        storegate::token::ACCESS_TOKEN_TTL_SECS / 60
    );
    accounts.store.db().close().await;
    Ok(())
}

/// `auth-service reset-totp <username>`: forgets the second factor and
/// ends every session; the next login enrolls a new one.
pub async fn reset_totp(config: &AuthConfig, username: &str) -> anyhow::Result<()> {
    let (accounts, target) = operator_target(config, username).await?;
    accounts.reset_totp(&target, db::now()).await.map_err(|e| anyhow::anyhow!("{e}"))?;
    tracing::warn!(user_id = target.user_id, "an administrator reset an account's second factor");
    println!(
        "reset the second factor of {}: their sessions ended, and their next login shows a new QR code",
        target.username
    );
    accounts.store.db().close().await;
    Ok(())
}

/// Whose events `auth-service audit-log` lists.
#[derive(Clone, Copy, Debug)]
pub enum AuditFilter<'a> {
    All,
    /// The account that has this name now.
    Username(&'a str),
    /// The account with this id, deleted or not.
    UserId(i64),
}

/// `auth-service audit-log [--user <username> | --user-id <id>] [--limit
/// N]`: the newest security events first.
pub async fn audit_log(
    config: &AuthConfig,
    filter: AuditFilter<'_>,
    limit: u32,
) -> anyhow::Result<Vec<audit::Record>> {
    let (store, user_id) = match filter {
        AuditFilter::Username(username) => {
            let (accounts, target) = operator_target(config, username).await?;
            (accounts.store, Some(target.user_id))
        }
        AuditFilter::UserId(user_id) => (admin_store(config).await?, Some(user_id)),
        AuditFilter::All => (admin_store(config).await?, None),
    };
    let records = store
        .audit_events(user_id, None, i64::from(limit.max(1)))
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    for r in &records {
        let account = match (&r.username, r.user_id) {
            (Some(name), Some(id)) => format!("{name} (id {id})"),
            (None, Some(id)) => format!("id {id}"),
            _ => "-".to_owned(),
        };
        println!(
            "{}  {:<30} {:<24} by {:<12} from {:<15} {}",
            r.occurred_at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            r.event,
            account,
            r.actor,
            r.client_addr.as_deref().unwrap_or("-"),
            r.detail.as_deref().unwrap_or("")
        );
    }
    store.db().close().await;
    Ok(records)
}

/// `auth-service revoke-key <kid>`: withdraws a signing key at once (it
/// leaked, say). When it was the one signing, a new key takes over now.
pub async fn revoke_key(config: &AuthConfig, kid: &str) -> anyhow::Result<()> {
    let store = admin_store(config).await?;
    let master_key = load_master_key(config)?;
    let now = db::now();
    let signing = store.current_signing_key(now).await.map_err(|e| anyhow::anyhow!("{e}"))?;
    let withdrawn = store.withdraw_signing_key(kid, now).await.map_err(|e| anyhow::anyhow!("{e}"))?;
    anyhow::ensure!(withdrawn, "no signing key {kid:?} that is not withdrawn already");
    tracing::warn!(kid, "an administrator withdrew a signing key");
    audit::record(&store, audit::Entry::new(audit::Event::KeyWithdrawn, audit::Actor::Operator).detail(kid))
        .await;
    if signing.is_some_and(|k| k.kid == kid) {
        let new_kid = SigningKeys::rotate(&store, &master_key, Duration::ZERO).await?;
        println!("withdrew {kid}, the key that was signing; {new_kid} signs from now");
    } else {
        println!("withdrew {kid}");
    }
    println!(
        "it has left the JWK Set; verifiers drop it within their key refresh interval \
         (product-service: JWKS_REFRESH_INTERVAL_SECS)"
    );
    store.db().close().await;
    Ok(())
}

/// `auth-service rotate-keys`: publishes a new signing key now and signs
/// with it after `activate_after`.
pub async fn rotate_keys(config: &AuthConfig, activate_after: Duration) -> anyhow::Result<String> {
    let store = admin_store(config).await?;
    let master_key = load_master_key(config)?;
    let kid = SigningKeys::rotate(&store, &master_key, activate_after).await?;
    let entry = audit::Entry::new(audit::Event::KeyRotated, audit::Actor::Operator);
    audit::record(&store, entry.detail(format!("{kid}, signing in {}s", activate_after.as_secs()))).await;
    println!(
        "new signing key {kid} is published now and signs from {}s from now; \
         the current key retires then and stays published until its tokens have expired",
        activate_after.as_secs()
    );
    store.db().close().await;
    Ok(kid)
}
