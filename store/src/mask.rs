//! Share masks: one bit per snapshot-table slot (`SNAPSHOTS_MAX` bits).
//!
//! Every in-memory mask of the store (the live, deleting, delete-pass and
//! in-use masks, a record's share mask, a chunk group's union) is a
//! `Mask`, so its width follows `csnap_pools::SHARE_MASK_WORDS`. On disk a
//! leaf record and the superblock's delete-pass mask hold one 64-bit word
//! today (format 1; `SHARE_MASK_WORDS == 1` is asserted in the pools);
//! ARCHITECTURE.md 2.11 says how records name wider masks.

use core::ops::{BitAnd, BitAndAssign, BitOr, BitOrAssign, Not};

use csnap_pools::{SHARE_MASK_WORDS, SNAPSHOTS_MAX};

/// A set of snapshot-table slots.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Mask([u64; SHARE_MASK_WORDS]);

impl Mask {
    /// No slot.
    pub const EMPTY: Mask = Mask([0; SHARE_MASK_WORDS]);

    /// The mask of one slot. Slots past `SNAPSHOTS_MAX` give the empty mask.
    pub fn bit(slot: usize) -> Mask {
        let mut m = Mask::EMPTY;
        m.insert(slot);
        m
    }

    /// A mask from its words, lowest slots first.
    pub const fn from_words(words: [u64; SHARE_MASK_WORDS]) -> Mask {
        Mask(words)
    }

    /// Its words, lowest slots first.
    pub const fn words(&self) -> &[u64; SHARE_MASK_WORDS] {
        &self.0
    }

    /// Whether `slot` is in the mask.
    pub fn contains(&self, slot: usize) -> bool {
        slot < SNAPSHOTS_MAX && self.0[slot / 64] & (1 << (slot % 64)) != 0
    }

    /// Adds `slot` (no-op past `SNAPSHOTS_MAX`).
    pub fn insert(&mut self, slot: usize) {
        if slot < SNAPSHOTS_MAX {
            self.0[slot / 64] |= 1 << (slot % 64);
        }
    }

    /// Removes `slot`.
    pub fn remove(&mut self, slot: usize) {
        if slot < SNAPSHOTS_MAX {
            self.0[slot / 64] &= !(1 << (slot % 64));
        }
    }

    /// Whether no slot is in the mask.
    pub fn is_empty(&self) -> bool {
        self.0.iter().all(|&w| w == 0)
    }

    /// Whether the two masks share a slot.
    pub fn intersects(&self, other: Mask) -> bool {
        !(*self & other).is_empty()
    }

    /// Slots in the mask.
    pub fn count(&self) -> u32 {
        self.0.iter().map(|w| w.count_ones()).sum()
    }

    /// The only slot of a one-slot mask.
    pub fn single(&self) -> Option<usize> {
        if self.count() == 1 {
            self.lowest()
        } else {
            None
        }
    }

    /// The lowest slot in the mask.
    pub fn lowest(&self) -> Option<usize> {
        self.0
            .iter()
            .enumerate()
            .find(|(_, &w)| w != 0)
            .map(|(i, w)| i * 64 + w.trailing_zeros() as usize)
    }

    /// The slots in the mask, in ascending order.
    pub fn slots(self) -> Slots {
        Slots(self)
    }
}

/// Iterator over a mask's slots (`Mask::slots`).
#[derive(Debug, Clone)]
pub struct Slots(Mask);

impl Iterator for Slots {
    type Item = usize;

    fn next(&mut self) -> Option<usize> {
        let s = self.0.lowest()?;
        self.0.remove(s);
        Some(s)
    }
}

impl BitOr for Mask {
    type Output = Mask;
    fn bitor(mut self, o: Mask) -> Mask {
        self |= o;
        self
    }
}

impl BitOrAssign for Mask {
    fn bitor_assign(&mut self, o: Mask) {
        for (a, b) in self.0.iter_mut().zip(o.0) {
            *a |= b;
        }
    }
}

impl BitAnd for Mask {
    type Output = Mask;
    fn bitand(mut self, o: Mask) -> Mask {
        self &= o;
        self
    }
}

impl BitAndAssign for Mask {
    fn bitand_assign(&mut self, o: Mask) {
        for (a, b) in self.0.iter_mut().zip(o.0) {
            *a &= b;
        }
    }
}

impl Not for Mask {
    type Output = Mask;
    fn not(mut self) -> Mask {
        for a in &mut self.0 {
            *a = !*a;
        }
        self
    }
}

impl core::fmt::LowerHex for Mask {
    /// Highest word first, like one wide integer.
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        let mut started = false;
        for (i, w) in self.0.iter().enumerate().rev() {
            if started {
                write!(f, "{w:016x}")?;
            } else if *w != 0 || i == 0 {
                if f.alternate() {
                    write!(f, "0x")?;
                }
                write!(f, "{w:x}")?;
                started = true;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_operations_and_iteration() {
        let mut m = Mask::EMPTY;
        assert!(m.is_empty() && m.lowest().is_none() && m.single().is_none());
        m.insert(3);
        assert_eq!(m.single(), Some(3));
        m.insert(SNAPSHOTS_MAX - 1);
        m.insert(SNAPSHOTS_MAX); // ignored
        assert_eq!(m.count(), 2);
        assert_eq!(m.slots().collect::<Vec<_>>(), [3, SNAPSHOTS_MAX - 1]);
        assert!(m.contains(3) && !m.contains(4) && !m.contains(SNAPSHOTS_MAX));
        let n = Mask::bit(3);
        assert_eq!(m & !n, Mask::bit(SNAPSHOTS_MAX - 1));
        assert_eq!((m & n), n);
        assert!(m.intersects(n) && !(m & !n).intersects(n));
        assert_eq!(
            n | Mask::bit(5),
            Mask::from_words({
                let mut w = [0; SHARE_MASK_WORDS];
                w[0] = (1 << 3) | (1 << 5);
                w
            })
        );
        m.remove(3);
        assert_eq!(m.lowest(), Some(SNAPSHOTS_MAX - 1));
        assert_eq!(format!("{:#x}", Mask::bit(4)), "0x10");
        assert_eq!(!Mask::EMPTY & Mask::bit(0), Mask::bit(0));
    }
}
