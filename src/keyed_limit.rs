//! Work in flight bounded twice: a few at a time per key (a caller, a
//! client address) and a cap for the whole server. Over either bound a
//! call is refused at once, never queued: a queue would only move the cost
//! into waiting calls (and, under a flood, into memory).
//!
//! Written here rather than taken from a crate: the maintained keyed
//! limiters limit rates (`governor`), not work in flight; this is a count
//! per key beside a tokio semaphore.

use std::{
    collections::HashMap,
    hash::Hash,
    sync::{Arc, Mutex},
};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

#[derive(Debug)]
pub struct KeyedLimit<K> {
    per_key: usize,
    /// In flight per key; a key with none has no entry, so the map holds at
    /// most as many entries as there is work in flight.
    running: Mutex<HashMap<K, usize>>,
    total: Arc<Semaphore>,
}

/// Why [`KeyedLimit::try_start`] refused.
#[derive(Debug, PartialEq, Eq)]
pub enum Refused {
    /// This key has its share in flight.
    Key,
    /// The whole server is at its cap.
    Total,
}

/// A place taken; given back when dropped (also when a call is cancelled).
#[derive(Debug)]
pub struct Permit<K: Eq + Hash> {
    limit: Arc<KeyedLimit<K>>,
    key: K,
    _total: OwnedSemaphorePermit,
}

impl<K: Eq + Hash + Clone> KeyedLimit<K> {
    /// `per_key` at a time per key and `total` in all (each at least 1).
    pub fn new(per_key: usize, total: usize) -> Arc<Self> {
        Arc::new(KeyedLimit {
            per_key: per_key.max(1),
            running: Mutex::default(),
            total: Arc::new(Semaphore::new(total.max(1))),
        })
    }

    /// A place for `key` now, or why not.
    pub fn try_start(self: &Arc<Self>, key: &K) -> Result<Permit<K>, Refused> {
        let mut running = self.running.lock().unwrap_or_else(|e| e.into_inner());
        let mine = running.get(key).copied().unwrap_or(0);
        if mine >= self.per_key {
            return Err(Refused::Key);
        }
        // Taken under the map's lock, so that a key's count and the total
        // never disagree.
        let total = Arc::clone(&self.total).try_acquire_owned().map_err(|_| Refused::Total)?;
        running.insert(key.clone(), mine + 1);
        Ok(Permit { limit: Arc::clone(self), key: key.clone(), _total: total })
    }

    /// How many places `key` holds now.
    pub fn in_flight(&self, key: &K) -> usize {
        self.running.lock().unwrap_or_else(|e| e.into_inner()).get(key).copied().unwrap_or(0)
    }
}

impl<K: Eq + Hash> Drop for Permit<K> {
    fn drop(&mut self) {
        let mut running = self.limit.running.lock().unwrap_or_else(|e| e.into_inner());
        match running.get_mut(&self.key) {
            Some(count) if *count > 1 => *count -= 1,
            _ => {
                running.remove(&self.key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_key_has_its_share_and_the_server_its_cap() {
        let limit = KeyedLimit::new(2, 3);
        let a1 = limit.try_start(&"a").unwrap();
        let _a2 = limit.try_start(&"a").unwrap();
        assert_eq!(limit.try_start(&"a").unwrap_err(), Refused::Key, "a third of a's");
        let b1 = limit.try_start(&"b").unwrap();
        assert_eq!(limit.try_start(&"c").unwrap_err(), Refused::Total, "the server's cap");
        drop(a1);
        let _a3 = limit.try_start(&"a").unwrap();
        drop(b1);
        assert_eq!(limit.in_flight(&"b"), 0);
        assert!(!limit.running.lock().unwrap().contains_key("b"), "no entry for a key without work");
        let _c = limit.try_start(&"c").unwrap();
    }
}
