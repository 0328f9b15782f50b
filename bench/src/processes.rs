//! Each service as a process of its own, the release binaries beside this
//! one, on the benchmark's database (existing and seeded): time from spawn
//! to SERVING, resident memory when idle, and peak resident memory under
//! load (auth-service through the login storm, product-service through
//! `get`). The in-process scenarios cannot tell the services' memory apart.

use std::{
    net::{SocketAddr, TcpListener},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use storegate_testkit::{TEST_MASTER_KEY, TestStack, health_serving};
use tonic::transport::Channel;

use crate::{
    runner::Outcome,
    scenarios::{Bench, Storm, storm_on},
};

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

/// A service binary running as a child; killed when dropped.
struct Service {
    name: &'static str,
    child: Child,
    channel: Channel,
    startup: Duration,
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_addr() -> anyhow::Result<SocketAddr> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}

impl Service {
    /// Spawns `binary` with `envs` and waits until its health check says
    /// SERVING; the time that took is its start-up time.
    async fn start(
        name: &'static str,
        binary: &Path,
        addr: SocketAddr,
        envs: &[(&str, &str)],
    ) -> anyhow::Result<Service> {
        let started = Instant::now();
        let mut child = Command::new(binary)
            .envs(envs.iter().copied())
            .env("METRICS_LISTEN_ADDR", "")
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| anyhow::anyhow!("cannot start {}: {e}", binary.display()))?;
        match wait_until_serving(name, addr, &mut child, started).await {
            Ok(channel) => Ok(Service { name, startup: started.elapsed(), child, channel }),
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                Err(e)
            }
        }
    }

    /// VmRSS and VmHWM (peak) of the process, in MiB.
    fn memory_mib(&self) -> (f64, f64) {
        crate::runner::memory_of(&format!("/proc/{}/status", self.child.id()))
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

/// A channel to `child` once its health check says SERVING.
async fn wait_until_serving(
    name: &str,
    addr: SocketAddr,
    child: &mut Child,
    started: Instant,
) -> anyhow::Result<Channel> {
    loop {
        anyhow::ensure!(started.elapsed() < START_TIMEOUT, "{name} did not start in {START_TIMEOUT:?}");
        if let Some(status) = child.try_wait()? {
            anyhow::bail!("{name} exited while starting: {status}");
        }
        if health_serving(addr).await {
            return Ok(TestStack::channel(addr).await);
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// The service binaries of this build, beside the benchmark's own binary.
fn binary(name: &str) -> anyhow::Result<PathBuf> {
    let path = std::env::current_exe()?.with_file_name(name);
    anyhow::ensure!(
        path.exists(),
        "{} is missing: build the services first (cargo build --release --workspace --bins)",
        path.display()
    );
    Ok(path)
}

pub async fn run(bench: &Bench, concurrency: usize, duration: Duration) -> anyhow::Result<Processes> {
    eprintln!("service processes (start-up, idle and peak memory):");
    let database_url = bench.stack.db.url.as_str();
    let auth_addr = free_addr()?;
    let auth_listen = auth_addr.to_string();
    let auth = Service::start(
        "auth-service",
        &binary("auth-service")?,
        auth_addr,
        &[
            ("DATABASE_URL", database_url),
            ("STOREGATE_MASTER_KEY", TEST_MASTER_KEY),
            ("AUTH_LISTEN_ADDR", &auth_listen),
        ],
    )
    .await?;
    let product_addr = free_addr()?;
    let product_listen = product_addr.to_string();
    let auth_url = format!("http://{auth_addr}");
    let product = Service::start(
        "product-service",
        &binary("product-service")?,
        product_addr,
        &[
            ("DATABASE_URL", database_url),
            ("PRODUCT_LISTEN_ADDR", &product_listen),
            ("AUTH_SERVICE_URL", &auth_url),
        ],
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
