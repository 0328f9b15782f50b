//! `storegate`: runs the local stack (`storegate up`) and is the command-line
//! client of both services.

mod account;
mod connect;
mod output;
mod products;
mod session;
mod up;

use clap::{Parser, Subcommand};
use tracing::Instrument as _;

#[derive(Parser)]
#[command(
    name = "storegate",
    version,
    about = "storegate: two-factor auth and a product catalogue over gRPC"
)]
struct Cli {
    #[command(flatten)]
    connect: connect::Endpoints,
    /// Print JSON instead of text, for scripts.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run auth-service and product-service together, on the SQLite default
    /// unless DATABASE_URL says otherwise.
    // Boxed: both services' settings make it far larger than the others.
    Up(Box<up::UpArgs>),
    /// Create an account.
    Register(account::RegisterArgs),
    /// Log in: password, then the code from your authenticator app (the QR
    /// code to scan is shown on the first login).
    Login(account::LoginArgs),
    /// Revoke this session's tokens and forget them (or end every session:
    /// --everywhere, --others).
    Logout(account::LogoutArgs),
    /// Change the password (current password and a code); other sessions end.
    ChangePassword(account::ChangePasswordArgs),
    /// Lost the authenticator: a recovery code resets two-factor, and the
    /// next login enrolls a new one.
    ResetTotp(account::ResetTotpArgs),
    /// Who the stored session belongs to.
    Whoami,
    /// The product catalogue.
    #[command(subcommand)]
    Products(products::ProductsCommand),
}

#[tokio::main]
async fn main() {
    storegate::alloc::return_freed_memory_promptly();
    let cli: Cli = storegate::config::parse_command_line();
    let out = output::Output { json: cli.json };
    if let Command::Up(args) = cli.command {
        if let Err(err) = up::up(*args).await {
            std::process::exit(output::report_error(&err));
        }
        return;
    }
    // A client command is one trace (exported when OTEL_* asks for it), its
    // calls to both services under one span.
    let telemetry =
        storegate::telemetry::init_logging_at(storegate::telemetry::LogFormat::Text, "storegate-cli", "warn");
    let span = tracing::info_span!("storegate command", otel.kind = "client");
    let result = async {
        match cli.command {
            Command::Up(_) => unreachable!("handled above"),
            Command::Register(args) => account::register(&cli.connect, &out, args).await,
            Command::Login(args) => account::login(&cli.connect, &out, args).await,
            Command::Logout(args) => account::logout(&cli.connect, &out, args).await,
            Command::ChangePassword(args) => account::change_password(&cli.connect, &out, args).await,
            Command::ResetTotp(args) => account::reset_totp(&cli.connect, &out, args).await,
            Command::Whoami => account::whoami(&cli.connect, &out).await,
            Command::Products(command) => products::run(&cli.connect, &out, command).await,
        }
    }
    .instrument(span)
    .await;
    drop(telemetry);
    if let Err(err) = result {
        std::process::exit(output::report_error(&err));
    }
}
