//! storegate's benchmark harness: starts the stack in-process on a fresh
//! database, seeds it, and runs every scenario beside the ceiling it can at
//! best reach on this machine, measured in the same run, so the ratios hold
//! on a noisy box.
//!
//!     cargo build --release --workspace --bins
//!     target/release/storegate-bench [--mysql-server-url mysql://root@127.0.0.1:3306]

mod processes;
mod runner;
mod scenarios;

use std::{path::PathBuf, time::Duration};

use clap::Parser;
use runner::{Outcome, memory_mib};
use storegate_testkit::Backend;

#[derive(Parser)]
#[command(name = "storegate-bench", about = "Throughput and latency of storegate beside their ceilings")]
struct Args {
    /// Run on a fresh database on this MySQL server instead of SQLite.
    #[arg(long)]
    mysql_server_url: Option<String>,
    /// Seconds per scenario.
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    /// Concurrent calls for the request scenarios and their ceilings.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Where the JSON results go.
    #[arg(long, default_value = "bench-results.json")]
    json: PathBuf,
}

fn row(outcome: &Outcome, ceiling: Option<(&str, f64)>) -> String {
    let ms = |d: Duration| format!("{:.2}", d.as_secs_f64() * 1e3);
    let ratio = ceiling
        .map_or(String::new(), |(name, rps)| format!("{:>5.0}% of {name}", outcome.rps() / rps * 100.0));
    format!(
        "| {:<10} | {:>4} | {:>9.0} | {:>7} | {:>7} | {:>7} | {:>6} | {ratio} |",
        outcome.name,
        outcome.concurrency,
        outcome.rps(),
        ms(outcome.percentile(0.5)),
        ms(outcome.percentile(0.99)),
        ms(outcome.percentile(0.999)),
        outcome.errors
    )
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    storegate::alloc::release_large_allocations();
    let args = Args::parse();
    let backend = match &args.mysql_server_url {
        Some(url) => Backend::MySql(url.clone()),
        None => Backend::Sqlite,
    };
    let backend_name = if args.mysql_server_url.is_some() { "MySQL" } else { "SQLite" };
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    eprintln!("storegate-bench on {backend_name}, {cores} cores, {} s per scenario", args.seconds);
    let duration = Duration::from_secs(args.seconds);
    let (c, bench) = (args.concurrency, scenarios::Bench::start(backend).await?);

    eprintln!("ceilings:");
    let noop = bench.noop(c, duration).await;
    let db_point = bench.db_point(c, duration).await;
    let db_page = bench.db_page(c, duration).await;
    let argon2 = bench.argon2(2 * cores, duration).await;
    eprintln!("scenarios:");
    let get = bench.get(c, duration).await;
    let list = bench.list(c, duration).await;
    let create = bench.create(c, duration).await;
    let adjust = bench.adjust(c, duration).await;
    let login = bench.login(2 * cores, duration).await;
    let storm = bench.storm().await;
    let (peak, current) = memory_mib();
    let processes = processes::run(&bench, c, duration).await;

    let point_ceiling =
        if noop.rps() < db_point.rps() { ("noop", noop.rps()) } else { ("db-point", db_point.rps()) };
    let table = [
        (&noop, None),
        (&db_point, None),
        (&db_page, None),
        (&argon2, None),
        (&get, Some(point_ceiling)),
        (&list, Some(("db-page", db_page.rps()))),
        (&create, None),
        (&adjust, None),
        (&login, Some(("argon2", argon2.rps()))),
    ];
    println!("\nstoregate-bench on {backend_name}, {cores} cores, {} s per scenario\n", args.seconds);
    println!("| scenario   | conc | req/s     | p50 ms  | p99 ms  | p999 ms | errors | vs ceiling |");
    println!("|------------|------|-----------|---------|---------|---------|--------|------------|");
    for (outcome, ceiling) in &table {
        println!("{}", row(outcome, *ceiling));
    }
    println!("\n{}", storm.summary());
    println!("\nprocess memory (both services and the harness): peak {peak:.1} MiB, now {current:.1} MiB");
    match &processes {
        Ok(processes) => {
            println!("\nEach service as its own process, on this database:\n\n{}", processes.summary())
        }
        Err(e) => println!("\nservice processes not measured: {e:#}"),
    }

    let results = serde_json::json!({
        "backend": backend_name,
        "cores": cores,
        "seconds_per_scenario": args.seconds,
        "scenarios": table.iter().map(|(o, c)| o.json(*c)).collect::<Vec<_>>(),
        "storm": storm.json(),
        "peak_rss_mib": peak,
        "processes": processes.as_ref().ok().map(processes::Processes::json),
    });
    std::fs::write(&args.json, serde_json::to_string_pretty(&results)?)?;
    eprintln!("results written to {}", args.json.display());
    Ok(())
}
