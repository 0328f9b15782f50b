//! How many `query` listings run at once: a few per caller, and a cap for
//! the whole server below the pool's size. A search reads the full-text
//! index, but its cost still grows with its matches (a one-letter prefix
//! over many distinct words takes most of a second), so without a bound one
//! signed-in caller could keep every pooled connection busy. A call over a
//! limit is refused at once (RESOURCE_EXHAUSTED), never queued.

use std::{sync::Arc, time::Duration};

use storegate::{
    ApiError,
    keyed_limit::{KeyedLimit, Permit, Refused},
};

/// What a client is told to wait before trying again.
const RETRY_AFTER: Duration = Duration::from_secs(1);

#[derive(Debug)]
pub struct SearchLimit(Arc<KeyedLimit<String>>);

/// A running search's place; given back when dropped.
pub type SearchPermit = Permit<String>;

impl SearchLimit {
    /// `per_caller` searches per caller and `server` in all (each at least 1).
    pub fn new(per_caller: usize, server: usize) -> Arc<Self> {
        Arc::new(SearchLimit(KeyedLimit::new(per_caller, server)))
    }

    /// A place for `caller`'s search now, or RESOURCE_EXHAUSTED.
    pub fn try_start(&self, caller: &str) -> Result<SearchPermit, ApiError> {
        self.0.try_start(&caller.to_owned()).map_err(|refused| {
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

    #[test]
    fn refusals_are_resource_exhausted_with_a_retry_delay() {
        let limit = SearchLimit::new(1, 2);
        let _a = limit.try_start("a").unwrap();
        for refused in [limit.try_start("a").unwrap_err(), {
            let _b = limit.try_start("b").unwrap();
            limit.try_start("c").unwrap_err()
        }] {
            assert!(
                matches!(refused, ApiError::ResourceExhausted { retry_after: Some(RETRY_AFTER), .. }),
                "{refused:?}"
            );
        }
    }
}
