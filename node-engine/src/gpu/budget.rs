//! Byte-budgeted LRU accounting for what is resident in GPU memory (segment vectors, IVF lists).
//! Pure bookkeeping: it decides what to evict, the caller frees the device buffers. Depends on
//! nothing but std, so it is tested without CUDA.

use std::collections::{BTreeMap, HashMap};
use std::hash::Hash;

/// Asking to hold an entry larger than the whole budget.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{bytes} bytes do not fit in a GPU memory budget of {capacity} bytes")]
pub struct ExceedsBudget {
    pub bytes: u64,
    pub capacity: u64,
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    bytes: u64,
    tick: u64,
}

/// LRU set of keys, each with a byte size, whose total never exceeds `capacity`.
///
/// Guarantees: after every successful [`LruBudget::admit`], `used() <= capacity()`; entries are
/// evicted least recently used first (use = admit or touch); an entry that is already present is
/// never evicted to make room for itself.
#[derive(Debug)]
pub struct LruBudget<K> {
    capacity: u64,
    used: u64,
    tick: u64,
    entries: HashMap<K, Entry>,
    order: BTreeMap<u64, K>,
}

impl<K: Clone + Eq + Hash> LruBudget<K> {
    pub fn new(capacity: u64) -> Self {
        Self {
            capacity,
            used: 0,
            tick: 0,
            entries: HashMap::new(),
            order: BTreeMap::new(),
        }
    }

    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    pub fn used(&self) -> u64 {
        self.used
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn contains(&self, key: &K) -> bool {
        self.entries.contains_key(key)
    }

    fn next_tick(&mut self) -> u64 {
        self.tick += 1;
        self.tick
    }

    /// Mark `key` as just used; returns whether it is present.
    pub fn touch(&mut self, key: &K) -> bool {
        let tick = self.next_tick();
        match self.entries.get_mut(key) {
            Some(e) => {
                self.order.remove(&e.tick);
                e.tick = tick;
                self.order.insert(tick, key.clone());
                true
            }
            None => false,
        }
    }

    /// Make `key` resident with `bytes`, evicting least recently used entries until it fits.
    /// Returns the evicted keys, oldest first (the caller frees their buffers). A key already
    /// present is only touched (its size is not changed) and nothing is evicted.
    ///
    /// Errors: `ExceedsBudget` when `bytes > capacity`; then nothing changes.
    pub fn admit(&mut self, key: K, bytes: u64) -> Result<Vec<K>, ExceedsBudget> {
        if self.touch(&key) {
            return Ok(Vec::new());
        }
        if bytes > self.capacity {
            return Err(ExceedsBudget {
                bytes,
                capacity: self.capacity,
            });
        }
        let mut evicted = Vec::new();
        while self.used + bytes > self.capacity {
            let Some((&oldest, _)) = self.order.iter().next() else {
                break;
            };
            if let Some(k) = self.order.remove(&oldest) {
                if let Some(e) = self.entries.remove(&k) {
                    self.used -= e.bytes;
                }
                evicted.push(k);
            }
        }
        let tick = self.next_tick();
        self.entries.insert(key.clone(), Entry { bytes, tick });
        self.order.insert(tick, key);
        self.used += bytes;
        Ok(evicted)
    }

    /// Forget `key`; returns its size when it was present.
    pub fn remove(&mut self, key: &K) -> Option<u64> {
        let e = self.entries.remove(key)?;
        self.order.remove(&e.tick);
        self.used -= e.bytes;
        Some(e.bytes)
    }

    /// Forget every key matching `pred`; returns them.
    pub fn remove_where(&mut self, mut pred: impl FnMut(&K) -> bool) -> Vec<K> {
        let keys: Vec<K> = self.entries.keys().filter(|k| pred(k)).cloned().collect();
        for k in &keys {
            self.remove(k);
        }
        keys
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    #[test]
    fn admitting_past_capacity_evicts_least_recently_used_first() {
        let mut b = LruBudget::new(100);
        assert_eq!(b.admit("a", 40).unwrap(), Vec::<&str>::new());
        assert_eq!(b.admit("b", 40).unwrap(), Vec::<&str>::new());
        assert!(b.touch(&"a"));
        // c needs 30: b (least recently used) goes, a stays.
        assert_eq!(b.admit("c", 30).unwrap(), vec!["b"]);
        assert_eq!(b.used(), 70);
        assert!(b.contains(&"a") && b.contains(&"c") && !b.contains(&"b"));
        // d needs 100: everything goes, oldest first.
        assert_eq!(b.admit("d", 100).unwrap(), vec!["a", "c"]);
        assert_eq!(b.used(), 100);
    }

    #[test]
    fn entry_larger_than_budget_is_refused_and_changes_nothing() {
        let mut b = LruBudget::new(100);
        b.admit(1u32, 60).unwrap();
        assert_eq!(
            b.admit(2, 101).unwrap_err(),
            ExceedsBudget {
                bytes: 101,
                capacity: 100
            }
        );
        assert_eq!(b.used(), 60);
        assert!(b.contains(&1));
    }

    #[test]
    fn readmitting_a_resident_key_only_touches_it() {
        let mut b = LruBudget::new(100);
        b.admit("a", 50).unwrap();
        b.admit("b", 50).unwrap();
        assert_eq!(b.admit("a", 50).unwrap(), Vec::<&str>::new());
        assert_eq!(b.admit("c", 50).unwrap(), vec!["b"]);
    }

    #[test]
    fn remove_and_remove_where_release_their_bytes() {
        let mut b = LruBudget::new(1000);
        for (seg, list) in [(1u64, 0u32), (1, 1), (2, 0)] {
            b.admit((seg, list), 100).unwrap();
        }
        assert_eq!(b.remove(&(2, 0)), Some(100));
        assert_eq!(b.remove(&(2, 0)), None);
        let mut gone = b.remove_where(|k| k.0 == 1);
        gone.sort();
        assert_eq!(gone, vec![(1, 0), (1, 1)]);
        assert_eq!(b.used(), 0);
        assert!(b.is_empty());
    }

    #[test]
    fn random_workload_never_exceeds_capacity_and_matches_a_reference_lru() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        let mut b = LruBudget::new(1000);
        // Reference: a Vec ordered from least to most recently used.
        let mut reference: Vec<(u32, u64)> = Vec::new();
        for _ in 0..5000 {
            let key = rng.random_range(0..40u32);
            let bytes = rng.random_range(1..400u64);
            if rng.random_bool(0.1) {
                let expect = reference
                    .iter()
                    .position(|e| e.0 == key)
                    .map(|i| reference.remove(i).1);
                assert_eq!(b.remove(&key), expect);
                continue;
            }
            let evicted = b.admit(key, bytes).unwrap();
            let mut expect_evicted = Vec::new();
            if let Some(i) = reference.iter().position(|e| e.0 == key) {
                let e = reference.remove(i);
                reference.push(e);
            } else {
                let mut used: u64 = reference.iter().map(|e| e.1).sum();
                while used + bytes > 1000 {
                    let e = reference.remove(0);
                    used -= e.1;
                    expect_evicted.push(e.0);
                }
                reference.push((key, bytes));
            }
            assert_eq!(evicted, expect_evicted);
            assert!(b.used() <= b.capacity());
            assert_eq!(b.used(), reference.iter().map(|e| e.1).sum::<u64>());
            assert_eq!(b.len(), reference.len());
        }
    }
}
