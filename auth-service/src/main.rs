//! The auth-service binary: serves the API, or runs an admin command.

use auth_service::{
    AuthConfig,
    service_accounts::{DEFAULT_SECRET_GRACE_SECS, Output, commands as service_account},
};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "auth-service", version, about = "storegate accounts, two-factor login and tokens")]
struct Cli {
    #[command(flatten)]
    config: AuthConfig,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the gRPC API (the default).
    Serve,
    /// Bring the database schema up to date and exit (for deployments that
    /// migrate as a step of their own and start the services with
    /// MIGRATE_ON_START=false). Safe to run while services run or migrate.
    Migrate,
    /// Give a user a role (e.g. `admin`, which may change the catalogue).
    GrantRole {
        username: String,
        role: String,
    },
    /// Take a role away and end the user's sessions; access tokens already
    /// issued keep it until they expire (at most 15 minutes).
    RevokeRole {
        username: String,
        role: String,
    },
    /// End every session of a user (their refresh tokens stop working).
    RevokeSessions {
        username: String,
    },
    /// Lift the account-wide lock set after MAX_FAILED_LOGINS consecutive
    /// failed logins from unrecognised clients, and forget those failures.
    UnlockUser {
        username: String,
    },
    /// Every account: state (active, enrolling, locked, disabled), roles,
    /// live sessions, last login.
    ListUsers,
    /// One account in detail.
    ShowUser {
        username: String,
    },
    /// No login or refresh for this account until enable-user; its sessions
    /// end now.
    DisableUser {
        username: String,
    },
    /// Let a disabled account log in again.
    EnableUser {
        username: String,
    },
    /// Delete an account (its sessions end; products keep its id).
    DeleteUser {
        username: String,
    },
    /// Forget an account's second factor and end its sessions: the next
    /// login enrolls a new authenticator.
    ResetTotp {
        username: String,
    },
    /// The audit trail of security events, newest first.
    AuditLog {
        /// Only the events of the account that has this name now.
        #[arg(long, conflicts_with = "user_id")]
        user: Option<String>,
        /// Only the events of the account with this id, deleted or not
        /// (after a deletion the name may be another account's).
        #[arg(long)]
        user_id: Option<i64>,
        #[arg(long, default_value_t = 50)]
        limit: u32,
    },
    /// Withdraw a signing key at once: it leaves the JWK Set and signs
    /// nothing more (a new key takes over if it was signing).
    RevokeKey {
        kid: String,
    },
    /// Add a new signing key: published at once, used for signing after
    /// --activate-after-secs, when the current key retires.
    RotateKeys {
        /// Must exceed product-service's JWKS_REFRESH_INTERVAL_SECS, so that
        /// every verifier has the new key before the first token it signs.
        #[arg(long, default_value_t = 600)]
        activate_after_secs: u64,
    },
    /// Create a service account (a backend service's identity: no password,
    /// no second factor) and print its client_id and client_secret, the
    /// secret this once.
    CreateServiceAccount {
        name: String,
        /// A role it holds (repeat for more); none: it may only read.
        #[arg(long = "role")]
        roles: Vec<String>,
        #[arg(long, value_enum, default_value_t)]
        output: Output,
    },
    /// Every service account: client_id, state, roles.
    ListServiceAccounts {
        #[arg(long, value_enum, default_value_t)]
        output: Output,
    },
    /// One service account in detail.
    ShowServiceAccount {
        name: String,
        #[arg(long, value_enum, default_value_t)]
        output: Output,
    },
    /// Issue a new client secret; the old one keeps working for the grace.
    RotateServiceSecret {
        name: String,
        /// How long the old secret keeps working (seconds, at most 30 days).
        #[arg(long, default_value_t = DEFAULT_SECRET_GRACE_SECS)]
        grace_secs: u64,
        #[arg(long, value_enum, default_value_t)]
        output: Output,
    },
    /// No new token for this service account until enable-service-account.
    DisableServiceAccount {
        name: String,
    },
    EnableServiceAccount {
        name: String,
    },
    /// Delete a service account with its roles and secrets.
    DeleteServiceAccount {
        name: String,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    storegate::alloc::return_freed_memory_promptly();
    let cli: Cli = storegate::config::parse_command_line();
    let _telemetry = storegate::telemetry::init(cli.config.common.log_format, "auth-service");
    match cli.command.unwrap_or(Command::Serve) {
        Command::Migrate => cli.config.common.migrate_database().await,
        Command::Serve => {
            let shutdown = storegate::server::shutdown_signal();
            let listener = storegate::server::bind(&cli.config.listen_addr).await?;
            auth_service::run(cli.config, listener, shutdown).await
        }
        Command::GrantRole { username, role } => {
            auth_service::grant_role(&cli.config, &username, &role).await
        }
        Command::RevokeRole { username, role } => {
            auth_service::revoke_role(&cli.config, &username, &role).await
        }
        Command::RevokeSessions { username } => {
            auth_service::revoke_sessions(&cli.config, &username).await.map(drop)
        }
        Command::UnlockUser { username } => auth_service::unlock_user(&cli.config, &username).await.map(drop),
        Command::ListUsers => auth_service::list_users(&cli.config).await.map(drop),
        Command::ShowUser { username } => auth_service::show_user(&cli.config, &username).await.map(drop),
        Command::DisableUser { username } => {
            auth_service::set_user_disabled(&cli.config, &username, true).await.map(drop)
        }
        Command::EnableUser { username } => {
            auth_service::set_user_disabled(&cli.config, &username, false).await.map(drop)
        }
        Command::DeleteUser { username } => auth_service::delete_user(&cli.config, &username).await,
        Command::ResetTotp { username } => auth_service::reset_totp(&cli.config, &username).await,
        Command::AuditLog { user, user_id, limit } => {
            let filter = match (&user, user_id) {
                (Some(name), _) => auth_service::AuditFilter::Username(name),
                (None, Some(id)) => auth_service::AuditFilter::UserId(id),
                (None, None) => auth_service::AuditFilter::All,
            };
            auth_service::audit_log(&cli.config, filter, limit).await.map(drop)
        }
        Command::RevokeKey { kid } => auth_service::revoke_key(&cli.config, &kid).await,
        Command::RotateKeys { activate_after_secs } => {
            let activate_after = std::time::Duration::from_secs(activate_after_secs);
            auth_service::rotate_keys(&cli.config, activate_after).await.map(drop)
        }
        Command::CreateServiceAccount { name, roles, output } => {
            service_account::create(&cli.config, &name, &roles, output).await.map(drop)
        }
        Command::ListServiceAccounts { output } => service_account::list(&cli.config, output).await.map(drop),
        Command::ShowServiceAccount { name, output } => {
            service_account::show(&cli.config, &name, output).await.map(drop)
        }
        Command::RotateServiceSecret { name, grace_secs, output } => {
            service_account::rotate_secret(&cli.config, &name, grace_secs, output).await.map(drop)
        }
        Command::DisableServiceAccount { name } => {
            service_account::set_disabled(&cli.config, &name, true).await.map(drop)
        }
        Command::EnableServiceAccount { name } => {
            service_account::set_disabled(&cli.config, &name, false).await.map(drop)
        }
        Command::DeleteServiceAccount { name } => service_account::delete(&cli.config, &name).await,
    }
}
