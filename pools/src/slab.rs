//! Fixed-capacity containers reserved at init: a slab with a free list, and an
//! open-addressing map from u64 keys to slab indices.
//!
//! Both allocate exactly once, in `with_capacity`, sized from configuration.
//! Insertion into a full container returns `None`: the caller turns that into
//! backpressure or a clear error, never a panic and never a reallocation.

/// A slab of `T` with a free list.
#[derive(Debug)]
pub struct Slab<T> {
    items: Vec<Option<T>>,
    free: Vec<u32>,
}

impl<T> Slab<T> {
    /// Reserves room for `capacity` items. The only allocation.
    pub fn with_capacity(capacity: usize) -> Self {
        assert!(capacity < u32::MAX as usize);
        let mut items = Vec::with_capacity(capacity);
        items.resize_with(capacity, || None);
        let free = (0..u32::try_from(capacity).unwrap_or(0)).rev().collect();
        Slab { items, free }
    }

    /// Items the slab can hold.
    pub fn capacity(&self) -> usize {
        self.items.len()
    }

    /// Items in the slab.
    pub fn len(&self) -> usize {
        self.items.len() - self.free.len()
    }

    /// Whether the slab is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether the slab is full.
    pub fn is_full(&self) -> bool {
        self.free.is_empty()
    }

    /// Inserts an item; `None` when full.
    pub fn insert(&mut self, item: T) -> Option<u32> {
        let i = self.free.pop()?;
        let slot = &mut self.items[i as usize];
        debug_assert!(slot.is_none());
        *slot = Some(item);
        Some(i)
    }

    /// Removes and returns item `i`.
    pub fn remove(&mut self, i: u32) -> Option<T> {
        let item = self.items.get_mut(i as usize)?.take()?;
        // Never exceeds the reserved capacity: `i` was handed out by insert.
        self.free.push(i);
        Some(item)
    }

    /// Item `i`.
    pub fn get(&self, i: u32) -> Option<&T> {
        self.items.get(i as usize)?.as_ref()
    }

    /// Item `i`, writable.
    pub fn get_mut(&mut self, i: u32) -> Option<&mut T> {
        self.items.get_mut(i as usize)?.as_mut()
    }

    /// Live items with their indices.
    pub fn iter(&self) -> impl Iterator<Item = (u32, &T)> {
        self.items.iter().enumerate().filter_map(|(i, t)| {
            t.as_ref()
                .map(|t| (u32::try_from(i).unwrap_or(u32::MAX), t))
        })
    }
}

const EMPTY: u32 = u32::MAX;

/// An open-addressing map from u64 to u32 with linear probing and
/// backward-shift deletion, capacity fixed at init.
#[derive(Debug)]
pub struct U64Map {
    keys: Vec<u64>,
    vals: Vec<u32>,
    mask: usize,
    len: usize,
    max: usize,
}

fn hash(k: u64) -> usize {
    (k.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 20) as usize
}

impl U64Map {
    /// A map holding up to `max` entries (table sized to twice that).
    pub fn with_capacity(max: usize) -> Self {
        let table = (max.max(1) * 2).next_power_of_two();
        U64Map {
            keys: vec![0; table],
            vals: vec![EMPTY; table],
            mask: table - 1,
            len: 0,
            max,
        }
    }

    /// Entries in the map.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the map is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn slot_of(&self, k: u64) -> Option<usize> {
        let mut i = hash(k) & self.mask;
        loop {
            if self.vals[i] == EMPTY {
                return None;
            }
            if self.keys[i] == k {
                return Some(i);
            }
            i = (i + 1) & self.mask;
        }
    }

    /// The value for `k`.
    pub fn get(&self, k: u64) -> Option<u32> {
        self.slot_of(k).map(|i| self.vals[i])
    }

    /// Inserts or replaces; `false` when the map is full and `k` is new.
    pub fn insert(&mut self, k: u64, v: u32) -> bool {
        assert_ne!(v, EMPTY);
        if let Some(i) = self.slot_of(k) {
            self.vals[i] = v;
            return true;
        }
        if self.len >= self.max {
            return false;
        }
        let mut i = hash(k) & self.mask;
        while self.vals[i] != EMPTY {
            i = (i + 1) & self.mask;
        }
        self.keys[i] = k;
        self.vals[i] = v;
        self.len += 1;
        true
    }

    /// Every (key, value), in table order.
    pub fn iter(&self) -> impl Iterator<Item = (u64, u32)> + '_ {
        self.keys
            .iter()
            .zip(self.vals.iter())
            .filter(|(_, &v)| v != EMPTY)
            .map(|(&k, &v)| (k, v))
    }

    /// Removes every entry.
    pub fn clear(&mut self) {
        self.vals.iter_mut().for_each(|v| *v = EMPTY);
        self.len = 0;
    }

    /// Removes `k`, returning its value.
    pub fn remove(&mut self, k: u64) -> Option<u32> {
        let i = self.slot_of(k)?;
        let v = self.vals[i];
        let mut hole = i;
        let mut j = (i + 1) & self.mask;
        while self.vals[j] != EMPTY {
            let home = hash(self.keys[j]) & self.mask;
            let dist_home = j.wrapping_sub(home) & self.mask;
            let dist_hole = j.wrapping_sub(hole) & self.mask;
            if dist_home >= dist_hole {
                self.keys[hole] = self.keys[j];
                self.vals[hole] = self.vals[j];
                hole = j;
            }
            j = (j + 1) & self.mask;
        }
        self.vals[hole] = EMPTY;
        self.len -= 1;
        Some(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn slab_is_bounded_and_reuses_slots() {
        let mut s = Slab::with_capacity(3);
        let a = s.insert(1).unwrap();
        let b = s.insert(2).unwrap();
        let c = s.insert(3).unwrap();
        assert!(s.insert(4).is_none(), "a full slab refuses");
        assert_eq!(s.remove(b), Some(2));
        assert_eq!(s.remove(b), None);
        let d = s.insert(5).unwrap();
        assert_eq!(d, b);
        assert_eq!(
            (s.get(a), s.get(c), s.get(d)),
            (Some(&1), Some(&3), Some(&5))
        );
        assert_eq!(s.len(), 3);
    }

    #[test]
    fn map_matches_a_hashmap_under_churn() {
        let mut m = U64Map::with_capacity(100);
        let mut model = HashMap::new();
        let mut x = 12345u64;
        for step in 0..20_000u32 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let k = x % 300;
            if x.is_multiple_of(3) {
                assert_eq!(m.remove(k), model.remove(&k), "step {step}");
            } else {
                let ok = m.insert(k, step);
                if model.len() < 100 || model.contains_key(&k) {
                    assert!(ok);
                    model.insert(k, step);
                } else {
                    assert!(!ok, "a full map refuses a new key");
                }
            }
            assert_eq!(m.len(), model.len());
        }
        for k in 0..300 {
            assert_eq!(m.get(k), model.get(&k).copied());
        }
    }
}
