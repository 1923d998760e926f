//! The size-bounded LRU bookkeeping both stores share.

use lru::LruCache;

use super::Key;
use crate::metrics::StoreMetrics;

pub(super) struct Entry<V> {
    pub size: u64,
    pub value: V,
}

pub(super) struct LruIndex<V> {
    map: LruCache<Key, Entry<V>>,
    used: u64,
    capacity: u64,
    metrics: StoreMetrics,
}

impl<V> LruIndex<V> {
    pub fn new(capacity: u64, metrics: StoreMetrics) -> Self {
        LruIndex {
            map: LruCache::unbounded(),
            used: 0,
            capacity,
            metrics,
        }
    }

    /// Looks up and marks as most recently used.
    pub fn get(&mut self, key: &Key) -> Option<&mut Entry<V>> {
        self.map.get_mut(key)
    }

    pub fn contains(&self, key: &Key) -> bool {
        self.map.contains(key)
    }

    /// Inserts as most recently used and returns what had to go to stay within capacity.
    /// The inserted key itself is never evicted.
    pub fn insert(&mut self, key: Key, size: u64, value: V) -> Vec<(Key, Entry<V>)> {
        if let Some(old) = self.map.put(key, Entry { size, value }) {
            self.used -= old.size;
        }
        self.used += size;
        let mut evicted = Vec::new();
        while self.used > self.capacity {
            match self.map.peek_lru() {
                Some((k, _)) if *k == key => break,
                Some(_) => {}
                None => break,
            }
            if let Some((k, e)) = self.map.pop_lru() {
                self.used -= e.size;
                self.metrics.evictions.inc();
                self.metrics.evicted_bytes.inc_by(e.size);
                evicted.push((k, e));
            }
        }
        self.publish();
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
    fn replacing_a_key_does_not_double_count() {
        let mut idx = LruIndex::new(20, StoreMetrics::default());
        idx.insert(k(1), 10, ());
        idx.insert(k(1), 10, ());
        assert!(idx.insert(k(2), 10, ()).is_empty());
    }
}
