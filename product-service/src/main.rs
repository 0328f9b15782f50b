//! The product-service binary.

use clap::Parser;
use product_service::ProductConfig;

#[derive(Parser)]
#[command(name = "product-service", version, about = "storegate product catalogue")]
struct Cli {
    #[command(flatten)]
    config: ProductConfig,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    storegate::telemetry::init(cli.config.common.log_format);
    let shutdown = storegate::server::shutdown_signal();
    let listener = storegate::server::bind(&cli.config.listen_addr).await?;
    product_service::run(cli.config, listener, shutdown).await
}
