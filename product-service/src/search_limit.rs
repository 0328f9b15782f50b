//! How many `query` listings run at once: a few per caller, and a cap for
//! the whole server below the pool's size. A search reads the full-text
//! index, but its cost still grows with its matches (a one-letter prefix
//! over many distinct words takes most of a second), so without a bound one
//! signed-in caller could keep every pooled connection busy. A call over
//! its caller's share is refused at once (RESOURCE_EXHAUSTED); at the
//! server's cap it waits up to `SEARCH_WAIT_MS` for a place first, so that
//! a burst of different shoppers' searches is served in turn instead of
//! mostly refused (BENCHMARKS.md: 64 at once against a cap of 4).

use std::{sync::Arc, time::Duration};

use storegate::{
    ApiError,
    keyed_limit::{KeyedLimit, Permit, Refused},
};

/// What a client is told to wait before trying again.
const RETRY_AFTER: Duration = Duration::from_secs(1);

#[derive(Debug)]
pub struct SearchLimit {
    running: Arc<KeyedLimit<String>>,
    /// How long a search may wait for a place under the server's cap.
    wait: Duration,
}

/// A running search's place; given back when dropped.
pub type SearchPermit = Permit<String>;

impl SearchLimit {
    /// `per_caller` searches per caller and `server` in all (each at least
    /// 1); a search waits up to `wait` for a place under `server`.
    pub fn new(per_caller: usize, server: usize, wait: Duration) -> Arc<Self> {
        Arc::new(SearchLimit { running: KeyedLimit::new(per_caller, server), wait })
    }

    /// A place for `caller`'s search, or RESOURCE_EXHAUSTED.
    pub async fn start(&self, caller: &str) -> Result<SearchPermit, ApiError> {
        self.running.start_within(&caller.to_owned(), self.wait).await.map_err(|refused| {
            let message = match refused {
                Refused::Key => "too many searches of yours are running; wait for one to finish",
                Refused::Total => "the server is running as many searches as it can; try again shortly",
            };
            ApiError::ResourceExhausted { message, retry_after: Some(RETRY_AFTER) }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn refusals_are_resource_exhausted_with_a_retry_delay() {
        let limit = SearchLimit::new(1, 2, Duration::from_millis(10));
        let _a = limit.start("a").await.unwrap();
        for refused in [limit.start("a").await.unwrap_err(), {
            let _b = limit.start("b").await.unwrap();
            limit.start("c").await.unwrap_err()
        }] {
            assert!(
                matches!(refused, ApiError::ResourceExhausted { retry_after: Some(RETRY_AFTER), .. }),
                "{refused:?}"
            );
        }
    }
}
