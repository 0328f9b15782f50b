//! How many `query` listings run at once: a few per caller, and a cap for
//! the whole server below the pool's size. A filtered listing scans the
//! table (about a second on a few hundred long rows), so without a bound one
//! signed-in caller could keep every pooled connection busy. A call over a
//! limit is refused at once (RESOURCE_EXHAUSTED), never queued: a queue
//! would only move the cost into waiting calls.
//!
//! Written here rather than taken from a crate: the keyed limiters on
//! crates.io limit rates (`governor`), not calls in flight, and this is a
//! counter per caller beside a tokio semaphore.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use storegate::ApiError;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// What a client is told to wait before trying again.
const RETRY_AFTER: Duration = Duration::from_secs(1);

#[derive(Debug)]
pub struct SearchLimit {
    per_caller: usize,
    /// Searches in flight per caller; a caller with none has no entry, so
    /// the map holds at most as many entries as searches run.
    running: Mutex<HashMap<String, usize>>,
    server: Arc<Semaphore>,
}

/// A running search's place; given back when dropped (also when the call is
/// cancelled).
#[derive(Debug)]
pub struct SearchPermit {
    limit: Arc<SearchLimit>,
    caller: String,
    _server: OwnedSemaphorePermit,
}

impl SearchLimit {
    /// `per_caller` searches per caller and `server` in all (each at least 1).
    pub fn new(per_caller: usize, server: usize) -> Arc<Self> {
        Arc::new(SearchLimit {
            per_caller: per_caller.max(1),
            running: Mutex::default(),
            server: Arc::new(Semaphore::new(server.max(1))),
        })
    }

    /// A place for `caller`'s search now, or RESOURCE_EXHAUSTED.
    pub fn try_start(self: &Arc<Self>, caller: &str) -> Result<SearchPermit, ApiError> {
        let mut running = self.running.lock().unwrap_or_else(|e| e.into_inner());
        let mine = running.get(caller).copied().unwrap_or(0);
        if mine >= self.per_caller {
            return Err(busy("too many searches of yours are running; wait for one to finish"));
        }
        // Taken under the map's lock, so that a caller's count and the
        // server's permits never disagree.
        let server = Arc::clone(&self.server)
            .try_acquire_owned()
            .map_err(|_| busy("the server is running as many searches as it can; try again shortly"))?;
        running.insert(caller.to_owned(), mine + 1);
        Ok(SearchPermit { limit: Arc::clone(self), caller: caller.to_owned(), _server: server })
    }
}

impl Drop for SearchPermit {
    fn drop(&mut self) {
        let mut running = self.limit.running.lock().unwrap_or_else(|e| e.into_inner());
        match running.get_mut(&self.caller) {
            Some(count) if *count > 1 => *count -= 1,
            _ => {
                running.remove(&self.caller);
            }
        }
    }
}

fn busy(message: &'static str) -> ApiError {
    ApiError::ResourceExhausted { message, retry_after: Some(RETRY_AFTER) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_caller_has_its_share_and_the_server_its_cap() {
        let limit = SearchLimit::new(2, 3);
        let a1 = limit.try_start("a").unwrap();
        let _a2 = limit.try_start("a").unwrap();
        assert!(limit.try_start("a").is_err(), "a third of a's");
        let b1 = limit.try_start("b").unwrap();
        assert!(limit.try_start("c").is_err(), "the server's cap");
        drop(a1);
        let _a3 = limit.try_start("a").unwrap();
        drop(b1);
        assert_eq!(limit.running.lock().unwrap().get("b"), None, "no entry for a caller without searches");
        let _c = limit.try_start("c").unwrap();
    }
}
