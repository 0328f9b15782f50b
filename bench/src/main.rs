//! storegate's benchmark harness: starts the stack in-process on a fresh
//! database, seeds it, and runs every scenario beside the ceiling it can at
//! best reach on this machine, measured in the same run, so the ratios hold
//! on a noisy box.
//!
//!     cargo build --release --workspace --bins
//!     target/release/storegate-bench [--mysql-server-url mysql://root@127.0.0.1:3306]

mod processes;
mod scenarios;

use std::{path::PathBuf, time::Duration};

use clap::Parser;
use storegate_bench::runner::{Outcome, memory_mib};

const SCENARIOS: [&str; 10] =
    ["noop", "db-point", "db-page", "argon2", "get", "list", "create", "adjust", "login", "storm"];

#[derive(Parser)]
#[command(name = "storegate-bench", about = "Throughput and latency of storegate beside their ceilings")]
struct Args {
    /// Run on a fresh database on this MySQL server instead of SQLite.
    #[arg(long)]
    mysql_server_url: Option<String>,
    /// Seconds per scenario.
    #[arg(long, default_value_t = 8)]
    seconds: u64,
    /// Slices each scenario's time is cut into, run round-robin with the
    /// other scenarios and the ceilings.
    #[arg(long, default_value_t = 4)]
    rounds: u32,
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

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    storegate::alloc::return_freed_memory_promptly();
    let args = Args::parse();
    let (backend, backend_name) = storegate_bench::backend(args.mysql_server_url.as_deref());
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    eprintln!("storegate-bench on {backend_name}, {cores} cores, {} s per scenario", args.seconds);
    let (c, bench) = (args.concurrency, scenarios::Bench::start(backend).await?);

    // Each scenario's time is cut into slices run round-robin with the
    // ceilings, so that a slow patch of a shared machine (its speed varies
    // by up to 2x in minutes) falls on a scenario and its ceiling alike.
    let wanted = |name: &&str| args.only.is_empty() || args.only.iter().any(|o| o == name);
    let timed: Vec<&str> = SCENARIOS.into_iter().filter(|&name| name != "storm").filter(wanted).collect();
    let rounds = args.rounds.max(1);
    let slice = Duration::from_secs(args.seconds) / rounds;
    let mut outcomes: Vec<Outcome> = Vec::new();
    for round in 1..=rounds {
        eprintln!("round {round} of {rounds}:");
        for (i, name) in timed.iter().enumerate() {
            let concurrency = if matches!(*name, "argon2" | "login") { 2 * cores } else { c };
            let part = bench.run(name, concurrency, slice).await;
            match outcomes.get_mut(i) {
                Some(outcome) => outcome.absorb(part),
                None => outcomes.push(part),
            }
        }
    }
    let outcome = |name: &str| timed.iter().position(|n| *n == name).map(|i| &outcomes[i]);
    let (noop, db_point, db_page, argon2) =
        (outcome("noop"), outcome("db-point"), outcome("db-page"), outcome("argon2"));
    let (get, list, create, adjust, login) =
        (outcome("get"), outcome("list"), outcome("create"), outcome("adjust"), outcome("login"));
    let storm = if wanted(&"storm") { Some(bench.storm().await) } else { None };
    let (peak, current) = memory_mib();
    let duration = Duration::from_secs(args.seconds);
    let processes = if args.only.is_empty() { Some(processes::run(&bench, c, duration).await) } else { None };

    let rps = |o: Option<&Outcome>| o.map(Outcome::rps);
    let point_ceiling = match (rps(noop), rps(db_point)) {
        (Some(noop), Some(db)) if noop < db => Some(("noop", noop)),
        (Some(noop), None) => Some(("noop", noop)),
        (_, Some(db)) => Some(("db-point", db)),
        (None, None) => None,
    };
    let table: Vec<(&Outcome, Option<(&str, f64)>)> = [
        (noop, None),
        (db_point, None),
        (db_page, None),
        (argon2, None),
        (get, point_ceiling),
        (list, rps(db_page).map(|r| ("db-page", r))),
        (create, None),
        (adjust, None),
        (login, rps(argon2).map(|r| ("argon2", r))),
    ]
    .into_iter()
    .filter_map(|(outcome, ceiling)| outcome.map(|o| (o, ceiling)))
    .collect();
    println!(
        "\nstoregate-bench on {backend_name}, {cores} cores, {} s per scenario in {rounds} round-robin slices\n",
        args.seconds
    );
    println!("| scenario   | conc | req/s     | p50 ms  | p99 ms  | p999 ms | errors | vs ceiling |");
    println!("|------------|------|-----------|---------|---------|---------|--------|------------|");
    for (outcome, ceiling) in &table {
        println!("{}", outcome.table_row(10, true, *ceiling));
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
        "rounds": rounds,
        "scenarios": table.iter().map(|(o, c)| o.json(*c)).collect::<Vec<_>>(),
        "storm": storm.as_ref().map(scenarios::Storm::json),
        "peak_rss_mib": peak,
        "processes": processes.as_ref().and_then(|p| p.as_ref().ok()).map(processes::Processes::json),
    });
    std::fs::write(&args.json, serde_json::to_string_pretty(&results)?)?;
    eprintln!("results written to {}", args.json.display());
    Ok(())
}
