//! Work in flight bounded twice: a few at a time per key (a caller, a
//! client address) and a cap for the whole server. Over a key's share a
//! call is refused at once, never queued. At the server's cap it is refused
//! at once too ([`KeyedLimit::try_start`]), or waits a bounded time for a
//! place ([`KeyedLimit::start_within`]): the waiting calls are bounded by
//! the keys' shares, each holding its key's place while it waits.
//!
//! A limit made with [`KeyedLimit::fair`] also keeps a key from taking more
//! than half of the places still free: a key that already holds some may
//! take one more only while it holds fewer than half the free places. A
//! key holding none is admitted while any place is free. So `k` busy keys
//! hold at most `k / (k + 2)` of the cap together, and a newcomer finds a
//! place however many places each of them tries to take.
//!
//! Written here rather than taken from a crate: the maintained keyed
//! limiters limit rates (`governor`), not work in flight; this is a count
//! per key beside a tokio semaphore.

use std::{
    collections::HashMap,
    hash::Hash,
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

#[derive(Debug)]
pub struct KeyedLimit<K> {
    per_key: usize,
    /// Whether a key may hold at most half of the free places.
    fair: bool,
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
    _key: KeyPlace<K>,
    _total: OwnedSemaphorePermit,
}

/// A key's share taken; given back when dropped.
#[derive(Debug)]
struct KeyPlace<K: Eq + Hash> {
    limit: Arc<KeyedLimit<K>>,
    key: K,
}

impl<K: Eq + Hash + Clone> KeyedLimit<K> {
    /// `per_key` at a time per key and `total` in all (each at least 1).
    pub fn new(per_key: usize, total: usize) -> Arc<Self> {
        Arc::new(KeyedLimit {
            per_key: per_key.max(1),
            fair: false,
            running: Mutex::default(),
            total: Arc::new(Semaphore::new(total.max(1))),
        })
    }

    /// As [`KeyedLimit::new`], and a key that holds places may take another
    /// only while it holds fewer than half of the places still free (see
    /// the module's doc).
    pub fn fair(per_key: usize, total: usize) -> Arc<Self> {
        let mut limit = Self::new(per_key, total);
        Arc::get_mut(&mut limit).expect("just made").fair = true;
        limit
    }

    /// Whether a key holding `mine` places is at its share now.
    fn at_share(&self, mine: usize) -> bool {
        if mine >= self.per_key {
            return true;
        }
        self.fair && mine > 0 && mine >= (self.total.available_permits() / 2).max(1)
    }

    /// A place for `key` now, or why not.
    pub fn try_start(self: &Arc<Self>, key: &K) -> Result<Permit<K>, Refused> {
        let mut running = self.running.lock().unwrap_or_else(|e| e.into_inner());
        let mine = running.get(key).copied().unwrap_or(0);
        if self.at_share(mine) {
            return Err(Refused::Key);
        }
        // Taken under the map's lock, so that a key's count and the total
        // never disagree.
        let total = Arc::clone(&self.total).try_acquire_owned().map_err(|_| Refused::Total)?;
        running.insert(key.clone(), mine + 1);
        Ok(Permit { _key: KeyPlace { limit: Arc::clone(self), key: key.clone() }, _total: total })
    }

    /// A place for `key`, waiting up to `wait` for one under the server's
    /// cap (first come, first served); over the key's share, refused at
    /// once.
    pub async fn start_within(self: &Arc<Self>, key: &K, wait: Duration) -> Result<Permit<K>, Refused> {
        match self.try_start(key) {
            Err(Refused::Total) if !wait.is_zero() => {}
            started => return started,
        }
        let place = {
            let mut running = self.running.lock().unwrap_or_else(|e| e.into_inner());
            let mine = running.get(key).copied().unwrap_or(0);
            if self.at_share(mine) {
                return Err(Refused::Key);
            }
            running.insert(key.clone(), mine + 1);
            KeyPlace { limit: Arc::clone(self), key: key.clone() }
        };
        // On a timeout `place` is dropped: the key's share is given back.
        match tokio::time::timeout(wait, Arc::clone(&self.total).acquire_owned()).await {
            Ok(Ok(total)) => Ok(Permit { _key: place, _total: total }),
            _ => Err(Refused::Total),
        }
    }

    /// How many places `key` holds now.
    pub fn in_flight(&self, key: &K) -> usize {
        self.running.lock().unwrap_or_else(|e| e.into_inner()).get(key).copied().unwrap_or(0)
    }
}

impl<K: Eq + Hash> Drop for KeyPlace<K> {
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

    #[test]
    fn a_fair_limit_keeps_room_for_newcomers_however_many_keys_flood_it() {
        let limit = KeyedLimit::fair(1000, 1024);
        // 16 keys each take every place they are given.
        let mut held = Vec::new();
        for round in 0..1024 {
            let before = held.len();
            for key in 0..16 {
                if let Ok(permit) = limit.try_start(&key) {
                    held.push(permit);
                }
            }
            if held.len() == before {
                assert!(round > 0);
                break;
            }
        }
        // Each holds about 1024 / 18 places; the rest, about a ninth, stay free.
        for key in 0..16 {
            assert!(limit.in_flight(&key) <= 1024 / 18 + 1, "key {key} holds {}", limit.in_flight(&key));
        }
        assert!(limit.total.available_permits() >= 100, "{} free", limit.total.available_permits());
        // A newcomer gets a place, and so does the next one.
        let _new = limit.try_start(&100).expect("a newcomer finds a place");
        let _next = limit.try_start(&101).expect("and the next one");
        // Alone, a key takes at most a third of the cap.
        let alone = KeyedLimit::fair(1000, 30);
        let permits: Vec<_> = (0..30).map_while(|_| alone.try_start(&"a").ok()).collect();
        assert_eq!(permits.len(), 10);
        assert_eq!(alone.try_start(&"a").unwrap_err(), Refused::Key);
    }

    #[tokio::test(start_paused = true)]
    async fn a_call_waits_for_the_servers_cap_but_not_for_its_keys_share() {
        let limit = KeyedLimit::new(1, 1);
        let a = limit.try_start(&"a").unwrap();
        let wait = Duration::from_millis(250);
        assert_eq!(limit.start_within(&"a", wait).await.unwrap_err(), Refused::Key, "a's share: at once");
        // b waits for the server's one place; it is refused when none frees
        // in time, and its share is given back.
        let started = tokio::time::Instant::now();
        assert_eq!(limit.start_within(&"b", wait).await.unwrap_err(), Refused::Total);
        assert_eq!(started.elapsed(), wait);
        assert_eq!(limit.in_flight(&"b"), 0);
        // A place freed while b waits is b's.
        let waiting = tokio::spawn({
            let limit = Arc::clone(&limit);
            async move { limit.start_within(&"b", wait).await.map(drop) }
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(limit.in_flight(&"b"), 1, "b holds its share while it waits");
        drop(a);
        assert_eq!(waiting.await.unwrap(), Ok(()));
        assert_eq!(limit.in_flight(&"b"), 0);
    }
}
