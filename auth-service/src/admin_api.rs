//! AdminService: account administration over gRPC for an `admin`-role
//! token (proto/storegate/auth/v1/admin.proto). The token is verified
//! with auth-service's own published keys, and the caller's role and
//! account are read again from the database on every call, so that an
//! admin who lost the role or was disabled stops at once, not when their
//! token expires.

use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};
use chrono::{DateTime, Utc};
use storegate::{
    ApiError,
    pb::auth::v1::{
        AuditEvent, DeleteUserRequest, DeleteUserResponse, DisableUserRequest, EnableUserRequest,
        GetUserRequest, GrantRoleRequest, ListAuditEventsRequest, ListAuditEventsResponse, ListUsersRequest,
        ListUsersResponse, ResetUserTotpRequest, RevokeRoleRequest, RevokeUserSessionsRequest,
        RevokeUserSessionsResponse, UnlockUserRequest, User, admin_service_server::AdminService,
    },
    token::{KeySet, TokenVerifier, bearer_token},
};
use tonic::{Request, Response, Status};

use crate::{
    admin::{Accounts, NO_SUCH_USER, Target, parse_role},
    audit::{Actor, Record},
    client::{Client, TrustedProxies},
    keys::SigningKeys,
    store::{Account, AuthStore},
};

const ADMIN_ROLE: &str = "admin";
const NEEDS_TOKEN: &str = "this call needs an access token (authorization: Bearer <token>)";
const NEEDS_ADMIN: &str = "this call needs the admin role";
const NOT_YOURSELF: &str = "an administrator cannot do this to their own account";
const DEFAULT_PAGE_SIZE: i32 = 50;
const MAX_PAGE_SIZE: i32 = 1000;
const BAD_PAGE_TOKEN: &str = "not a page token of this listing; start again without one";

pub struct AdminApi {
    store: AuthStore,
    keys: SigningKeys,
    verifier: TokenVerifier,
    /// Whose `x-forwarded-for` names the caller's address in the audit trail.
    trusted_proxies: TrustedProxies,
}

/// The caller, once proven an admin.
struct Caller {
    user_id: i64,
    accounts: Accounts,
}

impl AdminApi {
    pub fn new(
        store: AuthStore,
        keys: SigningKeys,
        issuer: &str,
        audience: &str,
        trusted_proxies: TrustedProxies,
    ) -> AdminApi {
        AdminApi { store, keys, verifier: TokenVerifier::new(issuer, audience), trusted_proxies }
    }

    async fn caller<T>(&self, request: &Request<T>) -> Result<Caller, ApiError> {
        let header = request.metadata().get("authorization").and_then(|v| v.to_str().ok());
        let token = bearer_token(header).ok_or(ApiError::Unauthenticated(NEEDS_TOKEN))?;
        // The published set, cached as GetJwks serves it (a withdrawn key
        // leaves it within seconds): no database read per call for it.
        let keys = KeySet::parse_jwks_json(&self.keys.jwks_json().await?)
            .map_err(|e| ApiError::Internal(anyhow::Error::new(e)))?;
        let claims =
            self.verifier.verify(&keys, token).map_err(|_| ApiError::Unauthenticated(NEEDS_TOKEN))?;
        let user_id = claims.user_id().ok_or(ApiError::PermissionDenied(
            "AdminService is for people: a service account cannot call it",
        ))?;
        if !claims.has_role(ADMIN_ROLE) {
            return Err(ApiError::PermissionDenied(NEEDS_ADMIN));
        }
        // The database has the last word: a role revoked, an account
        // disabled or deleted since the token was signed.
        let account = self.store.account(user_id, storegate::db::now()).await?;
        match account {
            Some(a) if a.disabled_at.is_none() && a.roles.iter().any(|r| r == ADMIN_ROLE) => {}
            _ => return Err(ApiError::PermissionDenied(NEEDS_ADMIN)),
        }
        let client = Client::of(request, &self.trusted_proxies);
        let accounts = Accounts::new(self.store.clone(), Actor::Admin(user_id)).called_from(client);
        Ok(Caller { user_id, accounts })
    }
}

impl Caller {
    async fn target(&self, username: &str) -> Result<Target, ApiError> {
        if username.is_empty() {
            return Err(ApiError::invalid("username", "must not be empty"));
        }
        self.accounts.find(username).await?.ok_or_else(|| ApiError::NotFound(NO_SUCH_USER.to_owned()))
    }

    fn not_self(&self, target: &Target) -> Result<(), ApiError> {
        if target.user_id == self.user_id {
            return Err(ApiError::FailedPrecondition(NOT_YOURSELF.to_owned()));
        }
        Ok(())
    }

    async fn user(&self, target: &Target) -> Result<User, ApiError> {
        let account = self.accounts.account(target, storegate::db::now()).await?;
        account.map(user).ok_or_else(|| ApiError::NotFound(NO_SUCH_USER.to_owned()))
    }
}

fn timestamp(t: DateTime<Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp { seconds: t.timestamp(), nanos: t.timestamp_subsec_nanos() as i32 }
}

fn user(account: Account) -> User {
    User {
        id: account.id,
        username: account.username,
        roles: account.roles,
        enrolled: account.totp_confirmed_at.is_some(),
        create_time: Some(timestamp(account.created_at)),
        last_login_time: account.last_login_at.map(timestamp),
        lock_time: account.lock.map(|lock| timestamp(lock.since)),
        disable_time: account.disabled_at.map(timestamp),
        active_sessions: account.sessions,
        lock_expire_time: account.lock.map(|lock| prost_types::Timestamp { seconds: lock.until, nanos: 0 }),
        unlocked: false,
    }
}

fn audit_event(record: Record) -> AuditEvent {
    AuditEvent {
        id: record.id,
        occur_time: Some(timestamp(record.occurred_at)),
        event: record.event,
        user_id: record.user_id.unwrap_or(0),
        username: record.username.unwrap_or_default(),
        actor: record.actor,
        client_address: record.client_addr.unwrap_or_default(),
        detail: record.detail.unwrap_or_default(),
    }
}

fn page_size(requested: i32) -> Result<i64, ApiError> {
    match requested {
        n if n < 0 => Err(ApiError::invalid("page_size", "must not be negative")),
        0 => Ok(i64::from(DEFAULT_PAGE_SIZE)),
        n => Ok(i64::from(n.min(MAX_PAGE_SIZE))),
    }
}

/// Page tokens: base64url of `<listing>:<position>`, the listing named so
/// that one listing's token is refused by another.
fn encode_page_token(listing: &str, position: &str) -> String {
    URL_SAFE_NO_PAD.encode(format!("{listing}:{position}"))
}

fn decode_page_token(listing: &str, token: &str) -> Result<Option<String>, ApiError> {
    if token.is_empty() {
        return Ok(None);
    }
    let bad = || ApiError::invalid("page_token", BAD_PAGE_TOKEN);
    let bytes = URL_SAFE_NO_PAD.decode(token).map_err(|_| bad())?;
    let text = String::from_utf8(bytes).map_err(|_| bad())?;
    let position = text.strip_prefix(listing).and_then(|t| t.strip_prefix(':')).ok_or_else(bad)?;
    Ok(Some(position.to_owned()))
}

fn role_of(role: &str) -> Result<&str, ApiError> {
    parse_role(role).map_err(|message| ApiError::invalid("role", message))
}

type Answer<T> = Result<Response<T>, Status>;

#[tonic::async_trait]
impl AdminService for AdminApi {
    #[tracing::instrument(name = "ListUsers", skip_all)]
    async fn list_users(&self, request: Request<ListUsersRequest>) -> Answer<ListUsersResponse> {
        let caller = self.caller(&request).await?;
        let req = request.into_inner();
        let limit = page_size(req.page_size)?;
        let after = decode_page_token("users", &req.page_token)?;
        // One more than the page: whether another page follows.
        let mut accounts =
            caller.accounts.store.accounts_page(after.as_deref(), limit + 1, storegate::db::now()).await?;
        let more = accounts.len() as i64 > limit;
        accounts.truncate(limit as usize);
        let next_page_token = match (more, accounts.last()) {
            (true, Some(last)) => encode_page_token("users", &last.username),
            _ => String::new(),
        };
        Ok(Response::new(ListUsersResponse {
            users: accounts.into_iter().map(user).collect(),
            next_page_token,
        }))
    }

    #[tracing::instrument(name = "GetUser", skip_all)]
    async fn get_user(&self, request: Request<GetUserRequest>) -> Answer<User> {
        let caller = self.caller(&request).await?;
        let target = caller.target(&request.get_ref().username).await?;
        Ok(Response::new(caller.user(&target).await?))
    }

    #[tracing::instrument(name = "DisableUser", skip_all)]
    async fn disable_user(&self, request: Request<DisableUserRequest>) -> Answer<User> {
        let caller = self.caller(&request).await?;
        let target = caller.target(&request.get_ref().username).await?;
        caller.not_self(&target)?;
        caller.accounts.set_disabled(&target, true, storegate::db::now()).await?;
        tracing::warn!(
            user_id = target.user_id,
            admin = caller.user_id,
            "an administrator disabled an account"
        );
        Ok(Response::new(caller.user(&target).await?))
    }

    #[tracing::instrument(name = "EnableUser", skip_all)]
    async fn enable_user(&self, request: Request<EnableUserRequest>) -> Answer<User> {
        let caller = self.caller(&request).await?;
        let target = caller.target(&request.get_ref().username).await?;
        caller.accounts.set_disabled(&target, false, storegate::db::now()).await?;
        tracing::info!(
            user_id = target.user_id,
            admin = caller.user_id,
            "an administrator enabled an account"
        );
        Ok(Response::new(caller.user(&target).await?))
    }

    #[tracing::instrument(name = "DeleteUser", skip_all)]
    async fn delete_user(&self, request: Request<DeleteUserRequest>) -> Answer<DeleteUserResponse> {
        let caller = self.caller(&request).await?;
        let target = caller.target(&request.get_ref().username).await?;
        caller.not_self(&target)?;
        if !caller.accounts.delete(&target).await? {
            return Err(ApiError::NotFound(NO_SUCH_USER.to_owned()).into());
        }
        tracing::warn!(
            user_id = target.user_id,
            admin = caller.user_id,
            "an administrator deleted an account"
        );
        Ok(Response::new(DeleteUserResponse {}))
    }

    #[tracing::instrument(name = "ResetUserTotp", skip_all)]
    async fn reset_user_totp(&self, request: Request<ResetUserTotpRequest>) -> Answer<User> {
        let caller = self.caller(&request).await?;
        let target = caller.target(&request.get_ref().username).await?;
        caller.accounts.reset_totp(&target, storegate::db::now()).await?;
        tracing::warn!(
            user_id = target.user_id,
            admin = caller.user_id,
            "an administrator reset a second factor"
        );
        Ok(Response::new(caller.user(&target).await?))
    }

    #[tracing::instrument(name = "UnlockUser", skip_all)]
    async fn unlock_user(&self, request: Request<UnlockUserRequest>) -> Answer<User> {
        let caller = self.caller(&request).await?;
        let target = caller.target(&request.get_ref().username).await?;
        let unlocked = caller.accounts.unlock(&target, storegate::db::now()).await?;
        Ok(Response::new(User { unlocked, ..caller.user(&target).await? }))
    }

    #[tracing::instrument(name = "GrantRole", skip_all)]
    async fn grant_role(&self, request: Request<GrantRoleRequest>) -> Answer<User> {
        let caller = self.caller(&request).await?;
        let req = request.get_ref();
        let role = role_of(&req.role)?;
        let target = caller.target(&req.username).await?;
        caller.accounts.grant_role(&target, role).await?;
        Ok(Response::new(caller.user(&target).await?))
    }

    #[tracing::instrument(name = "RevokeRole", skip_all)]
    async fn revoke_role(&self, request: Request<RevokeRoleRequest>) -> Answer<User> {
        let caller = self.caller(&request).await?;
        let req = request.get_ref();
        let role = role_of(&req.role)?;
        let target = caller.target(&req.username).await?;
        if role == ADMIN_ROLE {
            caller.not_self(&target)?;
        }
        caller.accounts.revoke_role(&target, role, storegate::db::now()).await?;
        Ok(Response::new(caller.user(&target).await?))
    }

    #[tracing::instrument(name = "RevokeUserSessions", skip_all)]
    async fn revoke_user_sessions(
        &self,
        request: Request<RevokeUserSessionsRequest>,
    ) -> Answer<RevokeUserSessionsResponse> {
        let caller = self.caller(&request).await?;
        let target = caller.target(&request.get_ref().username).await?;
        let revoked_sessions = caller.accounts.revoke_sessions(&target, storegate::db::now()).await?;
        Ok(Response::new(RevokeUserSessionsResponse { revoked_sessions }))
    }

    #[tracing::instrument(name = "ListAuditEvents", skip_all)]
    async fn list_audit_events(
        &self,
        request: Request<ListAuditEventsRequest>,
    ) -> Answer<ListAuditEventsResponse> {
        let caller = self.caller(&request).await?;
        let req = request.into_inner();
        let limit = page_size(req.page_size)?;
        let user_id = match (req.username.as_str(), req.user_id) {
            ("", 0) => None,
            ("", id) if id > 0 => Some(id),
            ("", _) => return Err(ApiError::invalid("user_id", "must not be negative").into()),
            (name, 0) => Some(caller.target(name).await?.user_id),
            (_, _) => {
                return Err(ApiError::invalid("user_id", "give either username or user_id, not both").into());
            }
        };
        // The filter is part of the listing's name: a token is valid only
        // for the query that produced it.
        let listing = format!("audit/{}", user_id.map_or(String::new(), |id| id.to_string()));
        let before = match decode_page_token(&listing, &req.page_token)? {
            Some(id) => Some(id.parse::<i64>().map_err(|_| ApiError::invalid("page_token", BAD_PAGE_TOKEN))?),
            None => None,
        };
        let mut records = caller.accounts.store.audit_events(user_id, before, limit + 1).await?;
        let more = records.len() as i64 > limit;
        records.truncate(limit as usize);
        let next_page_token = match (more, records.last()) {
            (true, Some(last)) => encode_page_token(&listing, &last.id.to_string()),
            _ => String::new(),
        };
        Ok(Response::new(ListAuditEventsResponse {
            events: records.into_iter().map(audit_event).collect(),
            next_page_token,
        }))
    }
}
