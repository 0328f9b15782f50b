//! The auth-service binary: serves the API, or runs an admin command.

use auth_service::AuthConfig;
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
    /// Give a user a role (e.g. `admin`, which may change the catalogue).
    GrantRole { username: String, role: String },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    storegate::telemetry::init(cli.config.common.log_format);
    match cli.command.unwrap_or(Command::Serve) {
        Command::Serve => {
            let listener = storegate::server::bind(&cli.config.listen_addr).await?;
            auth_service::run(cli.config, listener, storegate::server::shutdown_signal()).await
        }
        Command::GrantRole { username, role } => {
            auth_service::grant_role(&cli.config, &username, &role).await
        }
    }
}
