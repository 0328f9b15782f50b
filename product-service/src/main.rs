//! The product-service binary: serves the API, or runs an admin command.

use clap::{Parser, Subcommand};
use product_service::ProductConfig;

#[derive(Parser)]
#[command(name = "product-service", version, about = "storegate product catalogue")]
struct Cli {
    #[command(flatten)]
    config: ProductConfig,
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
    /// Count the products afresh for ListProducts' total_size, after writes
    /// that did not keep the count (older replicas, SQL run by hand).
    RecountProducts,
    /// Print how the database runs every listing (each order, its first
    /// and a later page, and a search) and fail if one sorts the catalogue
    /// instead of reading its index in order: run it after a bulk load or
    /// a database upgrade.
    CheckPlans,
    /// Load products in bulk from a file of JSON lines, one product a line:
    /// {"name": …, "description": …, "price": "9.99", "stock": 5}. The whole
    /// file is checked first (nothing is written if a line is wrong), then
    /// imported 10,000 products per transaction.
    Import {
        /// The JSON-lines file.
        file: std::path::PathBuf,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    storegate::alloc::return_freed_memory_promptly();
    let cli: Cli = storegate::config::parse_command_line();
    let _telemetry = storegate::telemetry::init(cli.config.common.log_format, "product-service");
    match cli.command.unwrap_or(Command::Serve) {
        Command::Migrate => cli.config.common.migrate_database().await,
        Command::Serve => {
            let shutdown = storegate::server::shutdown_signal();
            let listener = storegate::server::bind(&cli.config.listen_addr).await?;
            product_service::run(cli.config, listener, shutdown).await
        }
        Command::RecountProducts => product_service::recount_products(&cli.config).await,
        Command::CheckPlans => product_service::check_plans(&cli.config).await,
        Command::Import { file } => product_service::import_products(&cli.config, &file).await,
    }
}
