//! Each service as a process of its own, the release binaries beside this
//! one, on the benchmark's database (existing and seeded): time from spawn
//! to SERVING, resident memory when idle, and peak resident memory under
//! load (auth-service through the login storm, product-service through
//! `get`). The in-process scenarios cannot tell the services' memory apart.

use std::{net::SocketAddr, path::Path, time::Duration};

use storegate_testkit::{
    TEST_MASTER_KEY, TestStack,
    process::{ServiceProcess, free_addr},
};
use tonic::transport::Channel;

use storegate_bench::runner::Outcome;

use crate::scenarios::{Bench, Storm, storm_on};

/// How long start-up may take before the run gives up on a service.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// Quiet time before idle memory is read, so start-up work has settled.
const SETTLE: Duration = Duration::from_secs(1);

pub struct ServiceNumbers {
    pub name: &'static str,
    pub startup: Duration,
    pub idle_mib: f64,
    pub peak_mib: f64,
    pub idle_after_load_mib: f64,
}

pub struct Processes {
    pub services: Vec<ServiceNumbers>,
    pub storm: Storm,
    pub get: Outcome,
}

/// A service binary running as a child (killed when dropped), with a
/// channel to it and how long it took to say SERVING.
struct Service {
    name: &'static str,
    process: ServiceProcess,
    channel: Channel,
    startup: Duration,
}

impl Service {
    /// Spawns `binary_name` with `envs` and waits until its health check
    /// says SERVING; the time that took is its start-up time.
    async fn start(
        name: &'static str,
        addr: SocketAddr,
        envs: &[(&str, String)],
        logs: &Path,
    ) -> anyhow::Result<Service> {
        let mut process = ServiceProcess::spawn(name, name, addr, envs, logs)?;
        let startup = process.wait_serving(START_TIMEOUT).await?;
        Ok(Service { name, process, channel: TestStack::channel(addr).await, startup })
    }

    /// VmRSS and VmHWM (peak) of the process, in MiB.
    fn memory_mib(&self) -> (f64, f64) {
        self.process.memory_mib()
    }

    async fn numbers_around(&self, load: impl Future<Output = ()>) -> ServiceNumbers {
        tokio::time::sleep(SETTLE).await;
        let (idle_mib, _) = self.memory_mib();
        load.await;
        tokio::time::sleep(SETTLE).await;
        let (idle_after_load_mib, peak_mib) = self.memory_mib();
        ServiceNumbers { name: self.name, startup: self.startup, idle_mib, peak_mib, idle_after_load_mib }
    }
}

pub async fn run(bench: &Bench, concurrency: usize, duration: Duration) -> anyhow::Result<Processes> {
    eprintln!("service processes (start-up, idle and peak memory):");
    let database_url = bench.stack.db.url.clone();
    let logs = storegate_topology::Scratch::new("bench-processes");
    let (auth_addr, product_addr) = (free_addr(), free_addr());
    let auth = Service::start(
        "auth-service",
        auth_addr,
        &[
            ("DATABASE_URL", database_url.clone()),
            ("STOREGATE_MASTER_KEY", TEST_MASTER_KEY.to_owned()),
            ("AUTH_LISTEN_ADDR", auth_addr.to_string()),
            ("RUST_LOG", "warn".to_owned()),
        ],
        &logs.path,
    )
    .await?;
    let product = Service::start(
        "product-service",
        product_addr,
        &[
            ("DATABASE_URL", database_url),
            ("PRODUCT_LISTEN_ADDR", product_addr.to_string()),
            ("AUTH_SERVICE_URL", format!("http://{auth_addr}")),
            ("RUST_LOG", "warn".to_owned()),
        ],
        &logs.path,
    )
    .await?;

    let mut storm = None;
    let auth_numbers = auth
        .numbers_around(async {
            storm = Some(storm_on(auth.channel.clone()).await);
        })
        .await;
    let mut get = None;
    let product_numbers = product
        .numbers_around(async {
            get = Some(bench.get_on(product.channel.clone(), concurrency, duration).await);
        })
        .await;
    Ok(Processes {
        services: vec![auth_numbers, product_numbers],
        storm: storm.expect("the storm ran"),
        get: get.expect("get ran"),
    })
}

impl Processes {
    pub fn summary(&self) -> String {
        let mut text = String::from(
            "| service         | start-up to SERVING | idle RSS | peak RSS under load | idle RSS after load |\n\
             |-----------------|---------------------|----------|---------------------|---------------------|\n",
        );
        for s in &self.services {
            text.push_str(&format!(
                "| {:<15} | {:>16.0} ms | {:>4.1} MiB | {:>15.1} MiB | {:>15.1} MiB |\n",
                s.name,
                s.startup.as_secs_f64() * 1e3,
                s.idle_mib,
                s.peak_mib,
                s.idle_after_load_mib,
            ));
        }
        text.push_str(&format!(
            "\nload: auth-service took the storm ({}); product-service took get at {} concurrent ({:.0} req/s, p99 {:.2} ms)",
            self.storm.summary(),
            self.get.concurrency,
            self.get.rps(),
            self.get.percentile(0.99).as_secs_f64() * 1e3,
        ));
        text
    }

    pub fn json(&self) -> serde_json::Value {
        let services: Vec<_> = self
            .services
            .iter()
            .map(|s| {
                serde_json::json!({
                    "service": s.name,
                    "startup_ms": (s.startup.as_secs_f64() * 1e4).round() / 10.0,
                    "idle_rss_mib": s.idle_mib,
                    "peak_rss_mib": s.peak_mib,
                    "idle_rss_after_load_mib": s.idle_after_load_mib,
                })
            })
            .collect();
        serde_json::json!({ "services": services, "storm": self.storm.json(), "get": self.get.json(None) })
    }
}
