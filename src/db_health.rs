//! Whether the database answers, known within about a second, so that calls
//! fail fast (UNAVAILABLE at once instead of after the pool's acquire
//! timeout) and health follows.
//!
//! The probe has a connection of its own: a ping through the pool would wait
//! behind busy connections under load and report a database that is only
//! busy as gone. Every [`PROBE_EVERY`] it checks that connection and, if
//! that fails, a new one; the database counts as gone when both fail or take
//! longer than [`PROBE_TIMEOUT`] each (a cut network answers nothing at all).

use std::{
    sync::{
        Arc, LazyLock,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use sqlx::ConnectOptions as _;
use tokio::sync::watch;

use crate::Db;

const PROBE_EVERY: Duration = Duration::from_millis(250);
/// Per try; a round tries the kept connection, then a new one.
const PROBE_TIMEOUT: Duration = Duration::from_millis(500);

/// Shared view of the probe's last answer; cheap to clone and to read.
#[derive(Clone, Debug)]
pub struct DbHealth {
    up: watch::Receiver<bool>,
}

impl DbHealth {
    /// Starts probing `db` in the background; the task ends when every
    /// [`DbHealth`] clone is gone. Starts as up: the caller has just used the
    /// database.
    pub fn watch(db: &Db) -> DbHealth {
        let (tx, up) = watch::channel(true);
        match db {
            Db::MySql(pool) => {
                let options = pool.connect_options();
                tokio::spawn(probe(tx, move || {
                    let options = Arc::clone(&options);
                    async move { options.connect().await }
                }));
            }
            Db::Sqlite(pool) => {
                let options = pool.connect_options();
                tokio::spawn(probe(tx, move || {
                    let options = Arc::clone(&options);
                    async move { options.connect().await }
                }));
            }
        }
        DbHealth { up }
    }

    pub fn is_up(&self) -> bool {
        *self.up.borrow()
    }

    /// Completes when the database is found gone (at once if it is now).
    pub async fn went_down(&self) {
        let mut up = self.up.clone();
        if up.wait_for(|up| !*up).await.is_err() {
            // The probe stopped (shutting down): nothing more to report.
            std::future::pending::<()>().await;
        }
    }

    /// Completes on every change, with the new state.
    pub async fn changed(&mut self) -> Option<bool> {
        self.up.changed().await.ok()?;
        Some(*self.up.borrow_and_update())
    }
}

/// When the probe last found the database gone, as time since [`BASE`].
/// Process-wide on purpose: the pools' `before_acquire` hooks, made before
/// any probe exists, read it to check connections opened before an outage
/// (see [`opened_before_last_outage`]); a second database in the process
/// (tests) only costs a ping more.
static LAST_OUTAGE_NANOS: AtomicU64 = AtomicU64::new(0);
static BASE: LazyLock<Instant> = LazyLock::new(Instant::now);

fn note_outage() {
    LAST_OUTAGE_NANOS.store(BASE.elapsed().as_nanos() as u64, Ordering::Relaxed);
}

/// Whether a connection opened `age` ago predates the last outage the probe
/// saw: such a connection may be dead while looking idle for only a moment
/// (its server or proxy dropped it), so it is checked before use.
pub fn opened_before_last_outage(age: Duration) -> bool {
    let outage = LAST_OUTAGE_NANOS.load(Ordering::Relaxed);
    outage != 0 && BASE.elapsed().saturating_sub(age).as_nanos() as u64 <= outage
}

/// One check of a connection: a ping, or on a Galera node whether it is
/// ready for queries (a node cut off from the cluster's majority still
/// answers a ping, but no statement).
pub trait Check: sqlx::Connection {
    fn check(&mut self) -> impl Future<Output = Result<(), sqlx::Error>> + Send;
}

impl Check for sqlx::SqliteConnection {
    async fn check(&mut self) -> Result<(), sqlx::Error> {
        sqlx::Connection::ping(self).await
    }
}

impl Check for sqlx::MySqlConnection {
    async fn check(&mut self) -> Result<(), sqlx::Error> {
        // wsrep_ready is OFF on any server without a cluster, too.
        let wsrep: Option<(String, String)> =
            sqlx::query_as("SHOW VARIABLES LIKE 'wsrep_on'").fetch_optional(&mut *self).await?;
        if !wsrep.is_some_and(|(_, on)| on.eq_ignore_ascii_case("ON")) {
            return Ok(());
        }
        let ready: Option<(String, String)> =
            sqlx::query_as("SHOW STATUS LIKE 'wsrep_ready'").fetch_optional(&mut *self).await?;
        match ready {
            Some((_, value)) if !value.eq_ignore_ascii_case("ON") => Err(sqlx::Error::Protocol(
                "the Galera node is not ready (outside the cluster's primary component)".into(),
            )),
            _ => Ok(()),
        }
    }
}

async fn probe<C, F, Fut>(tx: watch::Sender<bool>, connect: F)
where
    C: Check,
    F: Fn() -> Fut,
    Fut: Future<Output = Result<C, sqlx::Error>>,
{
    let mut connection: Option<C> = None;
    let mut interval = tokio::time::interval(PROBE_EVERY);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        interval.tick().await;
        if tx.is_closed() {
            return;
        }
        // The kept connection first; if it fails (it may only have been
        // dropped: a proxy moving clients, a server-side kill), a new one at
        // once. Gone means both failed.
        let mut answered = false;
        for _ in 0..2 {
            answered = tokio::time::timeout(PROBE_TIMEOUT, async {
                if connection.is_none() {
                    connection = Some(connect().await?);
                }
                match connection.as_mut() {
                    Some(c) => c.check().await,
                    None => Ok(()),
                }
            })
            .await
            .is_ok_and(|r| r.is_ok());
            if answered {
                break;
            }
            // Its state is unknown: start afresh.
            connection = None;
        }
        if !answered {
            note_outage();
        }
        tx.send_if_modified(|up| {
            let changed = *up != answered;
            if changed && answered {
                tracing::info!("the database answers again");
            } else if changed {
                tracing::warn!("the database does not answer; failing calls fast until it does");
            }
            *up = answered;
            changed
        });
    }
}
