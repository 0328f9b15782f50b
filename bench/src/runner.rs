//! Runs one scenario: `concurrency` workers calling as fast as they can for a
//! fixed time, every call's latency kept.

use std::{
    future::Future,
    sync::Arc,
    time::{Duration, Instant},
};

use serde_json::json;

pub struct Outcome {
    pub name: String,
    pub concurrency: usize,
    pub ok: u64,
    pub errors: u64,
    pub elapsed: Duration,
    latencies: Vec<Duration>,
}

impl Outcome {
    pub fn rps(&self) -> f64 {
        self.ok as f64 / self.elapsed.as_secs_f64()
    }

    pub fn percentile(&self, p: f64) -> Duration {
        if self.latencies.is_empty() {
            return Duration::ZERO;
        }
        self.latencies[((self.latencies.len() - 1) as f64 * p).round() as usize]
    }

    /// Adds another slice of the same scenario.
    pub fn absorb(&mut self, slice: Outcome) {
        self.ok += slice.ok;
        self.errors += slice.errors;
        self.elapsed += slice.elapsed;
        self.latencies.extend(slice.latencies);
        self.latencies.sort_unstable();
    }

    /// A Markdown table row: name (padded to `name_width`), calls in
    /// flight, req/s, p50, p99 (and p999 with `p999`) in ms, errors, and
    /// the share of the ceiling's req/s.
    pub fn table_row(&self, name_width: usize, p999: bool, ceiling: Option<(&str, f64)>) -> String {
        let ms = |p: f64| format!("{:>7.2}", self.percentile(p).as_secs_f64() * 1e3);
        let tail = if p999 { format!(" | {}", ms(0.999)) } else { String::new() };
        let ratio = ceiling
            .map_or(String::new(), |(name, rps)| format!("{:>5.0}% of {name}", self.rps() / rps * 100.0));
        format!(
            "| {:<name_width$} | {:>4} | {:>9.0} | {} | {}{tail} | {:>6} | {ratio} |",
            self.name,
            self.concurrency,
            self.rps(),
            ms(0.5),
            ms(0.99),
            self.errors
        )
    }

    pub fn json(&self, ceiling: Option<(&str, f64)>) -> serde_json::Value {
        let ms = |d: Duration| (d.as_secs_f64() * 1e6).round() / 1e3;
        json!({
            "scenario": self.name,
            "concurrency": self.concurrency,
            "requests_per_second": (self.rps() * 10.0).round() / 10.0,
            "ok": self.ok,
            "errors": self.errors,
            "p50_ms": ms(self.percentile(0.5)),
            "p99_ms": ms(self.percentile(0.99)),
            "p999_ms": ms(self.percentile(0.999)),
            "ceiling": ceiling.map(|(name, rps)| json!({ "scenario": name, "ratio": (self.rps() / rps * 1000.0).round() / 1000.0 })),
        })
    }
}

/// Calls `call(worker, iteration)` from `concurrency` workers for `duration`;
/// a call returns whether it succeeded.
pub async fn measure<F, Fut>(name: &str, concurrency: usize, duration: Duration, call: F) -> Outcome
where
    F: Fn(usize, u64) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = bool> + Send,
{
    eprint!("  {name:<10} {concurrency:>4} concurrent, {:?} … ", duration);
    let call = Arc::new(call);
    let started = Instant::now();
    let deadline = started + duration;
    let workers: Vec<_> = (0..concurrency)
        .map(|worker| {
            let call = call.clone();
            tokio::spawn(async move {
                let (mut ok, mut errors, mut latencies) = (0u64, 0u64, Vec::new());
                let mut iteration = 0;
                while Instant::now() < deadline {
                    let t = Instant::now();
                    if call(worker, iteration).await {
                        ok += 1;
                        latencies.push(t.elapsed());
                    } else {
                        errors += 1;
                    }
                    iteration += 1;
                }
                (ok, errors, latencies)
            })
        })
        .collect();
    let mut outcome = Outcome {
        name: name.to_owned(),
        concurrency,
        ok: 0,
        errors: 0,
        elapsed: Duration::ZERO,
        latencies: Vec::new(),
    };
    for worker in workers {
        let (ok, errors, latencies) = worker.await.expect("worker");
        outcome.ok += ok;
        outcome.errors += errors;
        outcome.latencies.extend(latencies);
    }
    outcome.elapsed = started.elapsed();
    outcome.latencies.sort();
    eprintln!("{:.0}/s", outcome.rps());
    outcome
}

/// Peak and current resident memory of this process, in MiB (Linux).
pub fn memory_mib() -> (f64, f64) {
    let (current, peak) = memory_of("/proc/self/status");
    (peak, current)
}

pub use storegate_testkit::process::memory_of;
