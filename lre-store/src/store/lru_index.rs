//! The size-bounded LRU bookkeeping both stores share.

use std::collections::HashMap;

use lru::LruCache;

use super::Key;
use crate::metrics::StoreMetrics;

pub(super) struct Entry<V> {
    pub size: u64,
    pub value: V,
}

/// Entries plus the bytes of unfinished uploads ("reserved"): both count against the
/// capacity, so what sits in the filesystem store's `tmp/` (or in a memory writer's buffer)
/// cannot push the store past its limit.
pub(super) struct LruIndex<V> {
    map: LruCache<Key, Entry<V>>,
    used: u64,
    reserved: u64,
    capacity: u64,
    metrics: StoreMetrics,
    /// Keys promised to someone (a worker's action about to hard-link them), with how many
    /// promises each: never evicted while held, present yet or not.
    pinned: HashMap<Key, usize>,
}

/// A reservation could not be made: in-flight uploads alone would exceed the capacity.
#[derive(Debug)]
pub(super) struct NoRoom {
    pub in_flight: u64,
    pub capacity: u64,
}

impl<V> LruIndex<V> {
    pub fn new(capacity: u64, metrics: StoreMetrics) -> Self {
        LruIndex {
            map: LruCache::unbounded(),
            used: 0,
            reserved: 0,
            capacity,
            metrics,
            pinned: HashMap::new(),
        }
    }

    /// Keeps `key` from eviction until as many `unpin`s. A present entry also becomes the
    /// most recently used, so pinned entries rarely sit where eviction looks first.
    pub fn pin(&mut self, key: Key) {
        *self.pinned.entry(key).or_default() += 1;
        self.map.get(&key);
    }

    /// Gives back one promise. When the key's last one goes and the store is over its size
    /// (pins kept it there), returns what must go now: waiting for the next write would
    /// leave the disk over its limit for as long as nothing is written.
    pub fn unpin(&mut self, key: &Key) -> Vec<(Key, Entry<V>)> {
        let Some(n) = self.pinned.get_mut(key) else {
            return Vec::new();
        };
        *n -= 1;
        if *n > 0 {
            return Vec::new();
        }
        self.pinned.remove(key);
        let evicted = self.evict_for(None);
        if !evicted.is_empty() {
            self.publish();
        }
        evicted
    }

    /// Looks up and marks as most recently used.
    pub fn get(&mut self, key: &Key) -> Option<&mut Entry<V>> {
        self.map.get_mut(key)
    }

    /// Every key held (entries, not reservations), without touching their recency.
    pub fn keys(&self) -> impl Iterator<Item = &Key> {
        self.map.iter().map(|(k, _)| k)
    }

    pub fn contains(&self, key: &Key) -> bool {
        self.map.contains(key)
    }

    /// Inserts as most recently used and returns what had to go to stay within capacity.
    /// The inserted key itself is never evicted.
    pub fn insert(&mut self, key: Key, size: u64, value: V) -> Vec<(Key, Entry<V>)> {
        self.commit(key, size, value, 0)
    }

    /// Turns `reserved` in-flight bytes into the entry `key`, in one step, so the bytes are
    /// counted throughout. Returns the evicted entries, as `insert`.
    pub fn commit(&mut self, key: Key, size: u64, value: V, reserved: u64) -> Vec<(Key, Entry<V>)> {
        self.reserved -= reserved.min(self.reserved);
        if let Some(old) = self.map.put(key, Entry { size, value }) {
            self.used -= old.size;
        }
        self.used += size;
        let evicted = self.evict_for(Some(key));
        self.publish();
        evicted
    }

    /// Whether `n` more in-flight bytes fit without evicting anything.
    pub fn fits(&self, n: u64) -> bool {
        self.used
            .checked_add(self.reserved)
            .and_then(|t| t.checked_add(n))
            .is_some_and(|t| t <= self.capacity)
    }

    /// Counts `n` more bytes of an unfinished upload against the capacity, evicting least
    /// recently used entries to make room. Fails, changing nothing, when in-flight bytes
    /// alone would exceed the capacity.
    pub fn reserve(&mut self, n: u64) -> Result<Vec<(Key, Entry<V>)>, NoRoom> {
        match self.reserved.checked_add(n) {
            Some(r) if r <= self.capacity => self.reserved = r,
            _ => {
                return Err(NoRoom {
                    in_flight: self.reserved,
                    capacity: self.capacity,
                })
            }
        }
        let evicted = self.evict_for(None);
        self.publish();
        Ok(evicted)
    }

    /// Gives back in-flight bytes of an upload that ended without becoming an entry.
    pub fn release(&mut self, n: u64) {
        self.reserved -= n.min(self.reserved);
        self.publish();
    }

    /// Evicts least recently used entries until entries plus reservations fit, never `keep`
    /// nor a pinned entry. When only those are left the store stays over its size until
    /// they are unpinned: a promise made to a running action is kept.
    fn evict_for(&mut self, keep: Option<Key>) -> Vec<(Key, Entry<V>)> {
        let mut evicted = Vec::new();
        let Some(mut over) = (self.used + self.reserved).checked_sub(self.capacity) else {
            return evicted;
        };
        if over == 0 {
            return evicted;
        }
        // One pass from the least recently used end, skipping pinned entries once (a scan
        // per victim would cost victims × pinned under the lock).
        let mut victims = Vec::new();
        for (k, e) in self.map.iter().rev() {
            if Some(*k) == keep || self.pinned.contains_key(k) {
                continue;
            }
            victims.push(*k);
            over = over.saturating_sub(e.size);
            if over == 0 {
                break;
            }
        }
        for k in victims {
            if let Some(e) = self.map.pop(&k) {
                self.used -= e.size;
                self.metrics.evictions.inc();
                self.metrics.evicted_bytes.inc_by(e.size);
                evicted.push((k, e));
            }
        }
        evicted
    }

    pub fn remove(&mut self, key: &Key) -> Option<Entry<V>> {
        let e = self.map.pop(key)?;
        self.used -= e.size;
        self.publish();
        Some(e)
    }

    fn publish(&self) {
        self.metrics.size_bytes.set(self.used as i64);
        self.metrics.entries.set(self.map.len() as i64);
        self.metrics.in_flight_bytes.set(self.reserved as i64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn k(n: u8) -> Key {
        Key::Cas([n; 32])
    }

    #[test]
    fn evicts_least_recently_used_first() {
        let mut idx = LruIndex::new(30, StoreMetrics::default());
        assert!(idx.insert(k(1), 10, ()).is_empty());
        assert!(idx.insert(k(2), 10, ()).is_empty());
        assert!(idx.insert(k(3), 10, ()).is_empty());
        idx.get(&k(1)); // 2 is now the oldest
        let ev = idx.insert(k(4), 10, ());
        assert_eq!(ev.iter().map(|(k, _)| *k).collect::<Vec<_>>(), vec![k(2)]);
        assert!(idx.contains(&k(1)) && idx.contains(&k(3)) && idx.contains(&k(4)));
        assert_eq!(idx.metrics.evictions.get(), 1);
        assert_eq!(idx.metrics.size_bytes.get(), 30);
    }

    #[test]
    fn reservations_evict_entries_and_count_until_committed_or_released() {
        let mut idx = LruIndex::new(30, StoreMetrics::default());
        idx.insert(k(1), 10, ());
        idx.insert(k(2), 10, ());
        assert!(idx.fits(10) && !idx.fits(11));
        // 15 in-flight bytes: the oldest entry goes to make room.
        let ev = idx.reserve(15).unwrap();
        assert_eq!(ev.iter().map(|(k, _)| *k).collect::<Vec<_>>(), vec![k(1)]);
        assert_eq!(idx.metrics.in_flight_bytes.get(), 15);
        // In-flight bytes alone may not exceed the capacity; a refusal changes nothing.
        let Err(err) = idx.reserve(16) else {
            panic!("16 more in-flight bytes fitted beside 15 in a store of 30")
        };
        assert_eq!((err.in_flight, err.capacity), (15, 30));
        assert!(idx.contains(&k(2)));
        // Committing turns the reservation into the entry without counting it twice.
        assert!(idx.commit(k(3), 15, (), 15).is_empty());
        assert_eq!(idx.metrics.in_flight_bytes.get(), 0);
        assert_eq!(idx.metrics.size_bytes.get(), 25);
        // A reservation that is released leaves no trace.
        idx.reserve(5).unwrap();
        idx.release(5);
        assert!(idx.fits(5) && !idx.fits(6));
    }

    #[test]
    fn pinned_entries_are_not_evicted_until_unpinned() {
        let mut idx = LruIndex::new(20, StoreMetrics::default());
        idx.insert(k(1), 10, ());
        idx.insert(k(2), 10, ());
        idx.pin(k(1));
        idx.pin(k(1));
        idx.pin(k(3)); // not there yet: pinned all the same once it comes
        idx.get(&k(1)); // the oldest is now 2, but pins alone must keep 1 too
        idx.insert(k(2), 10, ());
        let ev = idx.insert(k(3), 10, ());
        assert_eq!(ev.iter().map(|(k, _)| *k).collect::<Vec<_>>(), vec![k(2)]);
        // Only pinned entries left: the store goes over its size rather than break a pin.
        assert!(idx.insert(k(4), 10, ()).is_empty());
        assert!(idx.contains(&k(1)) && idx.contains(&k(3)) && idx.contains(&k(4)));
        assert!(idx.unpin(&k(1)).is_empty()); // one promise of two: 1 stays
        let ev = idx.insert(k(5), 1, ());
        assert_eq!(ev.iter().map(|(k, _)| *k).collect::<Vec<_>>(), vec![k(4)]);
        // The last promise of 1 goes while the store is over its size: 1 goes with it.
        let ev = idx.unpin(&k(1));
        assert_eq!(ev.iter().map(|(k, _)| *k).collect::<Vec<_>>(), vec![k(1)]);
        assert!(idx.unpin(&k(3)).is_empty());
        assert!(idx.insert(k(6), 1, ()).is_empty());
    }

    #[test]
    fn replacing_a_key_does_not_double_count() {
        let mut idx = LruIndex::new(20, StoreMetrics::default());
        idx.insert(k(1), 10, ());
        idx.insert(k(1), 10, ());
        assert!(idx.insert(k(2), 10, ()).is_empty());
    }
}
