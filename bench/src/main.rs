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

const SCENARIOS: [&str; 10] =
    ["noop", "db-point", "db-page", "argon2", "get", "list", "create", "adjust", "login", "storm"];

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
    /// Run only these scenarios and ceilings (comma-separated names, e.g.
    /// `noop,db-point,get`), for profiling one path; the service processes
    /// are measured only in a full run.
    #[arg(long, value_delimiter = ',', value_parser = clap::builder::PossibleValuesParser::new(SCENARIOS))]
    only: Vec<String>,
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

    let wanted = |name: &str| args.only.is_empty() || args.only.iter().any(|o| o == name);
    eprintln!("ceilings:");
    let noop = if wanted("noop") { Some(bench.noop(c, duration).await) } else { None };
    let db_point = if wanted("db-point") { Some(bench.db_point(c, duration).await) } else { None };
    let db_page = if wanted("db-page") { Some(bench.db_page(c, duration).await) } else { None };
    let argon2 = if wanted("argon2") { Some(bench.argon2(2 * cores, duration).await) } else { None };
    eprintln!("scenarios:");
    let get = if wanted("get") { Some(bench.get(c, duration).await) } else { None };
    let list = if wanted("list") { Some(bench.list(c, duration).await) } else { None };
    let create = if wanted("create") { Some(bench.create(c, duration).await) } else { None };
    let adjust = if wanted("adjust") { Some(bench.adjust(c, duration).await) } else { None };
    let login = if wanted("login") { Some(bench.login(2 * cores, duration).await) } else { None };
    let storm = if wanted("storm") { Some(bench.storm().await) } else { None };
    let (peak, current) = memory_mib();
    let processes = if args.only.is_empty() { Some(processes::run(&bench, c, duration).await) } else { None };

    let rps = |o: &Option<Outcome>| o.as_ref().map(Outcome::rps);
    let point_ceiling = match (rps(&noop), rps(&db_point)) {
        (Some(noop), Some(db)) if noop < db => Some(("noop", noop)),
        (Some(noop), None) => Some(("noop", noop)),
        (_, Some(db)) => Some(("db-point", db)),
        (None, None) => None,
    };
    let table: Vec<(&Outcome, Option<(&str, f64)>)> = [
        (&noop, None),
        (&db_point, None),
        (&db_page, None),
        (&argon2, None),
        (&get, point_ceiling),
        (&list, rps(&db_page).map(|r| ("db-page", r))),
        (&create, None),
        (&adjust, None),
        (&login, rps(&argon2).map(|r| ("argon2", r))),
    ]
    .into_iter()
    .filter_map(|(outcome, ceiling)| outcome.as_ref().map(|o| (o, ceiling)))
    .collect();
    println!("\nstoregate-bench on {backend_name}, {cores} cores, {} s per scenario\n", args.seconds);
    println!("| scenario   | conc | req/s     | p50 ms  | p99 ms  | p999 ms | errors | vs ceiling |");
    println!("|------------|------|-----------|---------|---------|---------|--------|------------|");
    for (outcome, ceiling) in &table {
        println!("{}", row(outcome, *ceiling));
    }
    if let Some(storm) = &storm {
        println!("\n{}", storm.summary());
    }
    println!("\nprocess memory (both services and the harness): peak {peak:.1} MiB, now {current:.1} MiB");
    match &processes {
        Some(Ok(processes)) => {
            println!("\nEach service as its own process, on this database:\n\n{}", processes.summary())
        }
        Some(Err(e)) => println!("\nservice processes not measured: {e:#}"),
        None => {}
    }

    let results = serde_json::json!({
        "backend": backend_name,
        "cores": cores,
        "seconds_per_scenario": args.seconds,
        "scenarios": table.iter().map(|(o, c)| o.json(*c)).collect::<Vec<_>>(),
        "storm": storm.as_ref().map(scenarios::Storm::json),
        "peak_rss_mib": peak,
        "processes": processes.as_ref().and_then(|p| p.as_ref().ok()).map(processes::Processes::json),
    });
    std::fs::write(&args.json, serde_json::to_string_pretty(&results)?)?;
    eprintln!("results written to {}", args.json.display());
    Ok(())
}
