//! The services as processes of their own (the binaries of this build), for
//! tests and benchmarks that run them as production does: several replicas,
//! signals, kill -9.

use std::{
    net::{SocketAddr, TcpListener},
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    time::{Duration, Instant},
};

use crate::health_serving;

/// A port free now on 127.0.0.1, for a child process to listen on. Taken
/// below Linux's ephemeral range (32768 up): a port the OS handed out as
/// port 0 may be handed out again as the source port of any outgoing
/// connection before the child binds it.
pub fn free_addr() -> SocketAddr {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    // Processes running tests at once start at different places.
    let start = std::process::id().wrapping_mul(7919);
    loop {
        let port = 20_000 + start.wrapping_add(NEXT.fetch_add(1, Ordering::Relaxed)) % 12_000;
        if let Ok(listener) = TcpListener::bind(("127.0.0.1", port as u16)) {
            return listener.local_addr().expect("a bound address");
        }
    }
}

/// A binary of this build: beside the running test or benchmark binary, or
/// one folder up (test binaries live in `target/<profile>/deps`).
pub fn binary(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let candidates =
        [exe.with_file_name(name), exe.parent().and_then(Path::parent).unwrap_or(&exe).join(name)];
    candidates.iter().find(|p| p.exists()).cloned().ok_or_else(|| {
        anyhow::anyhow!(
            "{name} is missing beside {}: build the binaries first (cargo build --workspace --bins)",
            exe.display()
        )
    })
}

/// A service binary running as a child, its output in a log file; killed
/// when dropped.
pub struct ServiceProcess {
    pub name: String,
    pub addr: SocketAddr,
    child: Child,
    log: PathBuf,
    command: Command,
}

impl ServiceProcess {
    /// Spawns `binary` (e.g. "auth-service") listening on `addr`, with
    /// `envs` on top of: metrics off, `RUST_LOG=info`, no shutdown grace, and
    /// no per-address registration limit (load generators and topology
    /// tests register users by the hundred from one loopback address; the
    /// limit has tests of its own).
    pub fn spawn(
        name: impl Into<String>,
        binary_name: &str,
        addr: SocketAddr,
        envs: &[(&str, String)],
        log_dir: &Path,
    ) -> anyhow::Result<ServiceProcess> {
        let name = name.into();
        let log = log_dir.join(format!("{name}.log"));
        let mut command = Command::new(binary(binary_name)?);
        command
            .env("METRICS_LISTEN_ADDR", "")
            .env("RUST_LOG", "info")
            .env("SHUTDOWN_GRACE_SECS", "0")
            .env("RUST_BACKTRACE", "0")
            .env("REGISTRATIONS_PER_CLIENT_PER_HOUR", "0")
            .env_remove("DATABASE_URL")
            .envs(envs.iter().map(|(k, v)| (*k, v.as_str())))
            .stdin(Stdio::null());
        let child = Self::start(&mut command, &log)?;
        Ok(ServiceProcess { name, addr, child, log, command })
    }

    fn start(command: &mut Command, log: &Path) -> anyhow::Result<Child> {
        let out = std::fs::OpenOptions::new().create(true).append(true).open(log)?;
        Ok(command.stdout(out.try_clone()?).stderr(out).spawn()?)
    }

    /// Starts the same command again (same address, same log) once the
    /// process has exited; kills it first if it still runs.
    pub fn respawn(&mut self) -> anyhow::Result<()> {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.child = Self::start(&mut self.command, &self.log)?;
        Ok(())
    }

    /// Waits until health says SERVING; fails with the log's tail when the
    /// process exits first or `timeout` passes.
    pub async fn wait_serving(&mut self, timeout: Duration) -> anyhow::Result<Duration> {
        let started = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait()? {
                anyhow::bail!("{} exited while starting ({status}):\n{}", self.name, self.log_tail(30));
            }
            if health_serving(self.addr).await {
                return Ok(started.elapsed());
            }
            if started.elapsed() > timeout {
                anyhow::bail!("{} not SERVING after {timeout:?}:\n{}", self.name, self.log_tail(30));
            }
            // Often: benchmarks take this as the start-up time.
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Whether the process has exited (and how).
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends `signal` (e.g. `libc::SIGTERM`, `libc::SIGKILL`).
    pub fn signal(&self, signal: i32) {
        // SAFETY: kill(2) on our own child's pid; no memory is involved.
        unsafe {
            libc::kill(self.child.id() as i32, signal);
        }
    }

    /// Waits up to `timeout` for the process to exit.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let started = Instant::now();
        while started.elapsed() < timeout {
            if let Some(status) = self.exited() {
                return Some(status);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        None
    }

    /// The last `lines` lines the process logged.
    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Everything the process logged.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Resident memory now (VmRSS) and at its peak (VmHWM), in MiB.
    pub fn memory_mib(&self) -> (f64, f64) {
        memory_of(&format!("/proc/{}/status", self.child.id()))
    }
}

/// Current (VmRSS) and peak (VmHWM) resident memory in MiB, from a
/// `/proc/<pid>/status` file; zeros where there is none.
pub fn memory_of(status_path: &str) -> (f64, f64) {
    let status = std::fs::read_to_string(status_path).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|kib| kib.parse::<f64>().ok())
            .map_or(0.0, |kib| kib / 1024.0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

impl Drop for ServiceProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
