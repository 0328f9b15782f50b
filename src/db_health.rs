//! Whether the database answers, known within about a second, so that calls
//! fail fast (UNAVAILABLE at once instead of after the pool's acquire
//! timeout) and health follows.
//!
//! The probe has a connection of its own: a ping through the pool would wait
//! behind busy connections under load and report a database that is only
//! busy as gone. A ping or connect that takes longer than
//! [`PROBE_TIMEOUT`] counts as gone (a cut network answers nothing at all).

use std::{sync::Arc, time::Duration};

use sqlx::ConnectOptions as _;
use tokio::sync::watch;

use crate::Db;

const PROBE_EVERY: Duration = Duration::from_millis(250);
const PROBE_TIMEOUT: Duration = Duration::from_millis(750);

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

async fn probe<C, F, Fut>(tx: watch::Sender<bool>, connect: F)
where
    C: sqlx::Connection,
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
        let answered = tokio::time::timeout(PROBE_TIMEOUT, async {
            match connection.as_mut() {
                Some(c) => c.ping().await,
                None => {
                    connection = Some(connect().await?);
                    Ok(())
                }
            }
        })
        .await
        .is_ok_and(|r| r.is_ok());
        if !answered {
            // Its state is unknown: start afresh next time.
            connection = None;
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
