//! Share masks: one bit per snapshot-table slot (`SNAPSHOTS_MAX` bits).
//!
//! Every in-memory mask of the store (the live, deleting, delete-pass and
//! in-use masks, a record's share mask, a chunk group's union) is a
//! `Mask`, so its width follows `csnap_pools::SHARE_MASK_WORDS`. On disk a
//! leaf record holds one 64-bit word and the index of its 64-slot window
//! (ARCHITECTURE.md 2.2); a version-2 superblock holds every word of the
//! delete-pass mask.

use core::ops::{BitAnd, BitAndAssign, BitOr, BitOrAssign, Not};

use csnap_pools::{SHARE_MASK_WORDS, SNAPSHOTS_MAX};

/// A set of snapshot-table slots: `W` 64-bit words, slot `i` is bit
/// `i % 64` of word `i / 64`. The store uses [`Mask`]; other widths exist
/// for the tests of a wider table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WideMask<const W: usize>([u64; W]);

/// The store's share mask: `SNAPSHOTS_MAX` slots.
pub type Mask = WideMask<SHARE_MASK_WORDS>;

static_assertions::const_assert!(SHARE_MASK_WORDS * 64 == SNAPSHOTS_MAX);

impl<const W: usize> Default for WideMask<W> {
    fn default() -> Self {
        Self::EMPTY
    }
}

impl<const W: usize> WideMask<W> {
    /// No slot.
    pub const EMPTY: Self = WideMask([0; W]);
    /// Slots the mask can hold.
    pub const SLOTS: usize = W * 64;

    /// The mask of one slot. Slots past `SLOTS` give the empty mask.
    pub fn bit(slot: usize) -> Self {
        let mut m = Self::EMPTY;
        m.insert(slot);
        m
    }

    /// A mask from its words, lowest slots first.
    pub const fn from_words(words: [u64; W]) -> Self {
        WideMask(words)
    }

    /// Its words, lowest slots first.
    pub const fn words(&self) -> &[u64; W] {
        &self.0
    }

    /// Whether `slot` is in the mask.
    pub fn contains(&self, slot: usize) -> bool {
        slot < Self::SLOTS && self.0[slot / 64] & (1 << (slot % 64)) != 0
    }

    /// Adds `slot` (no-op past `SLOTS`).
    pub fn insert(&mut self, slot: usize) {
        if slot < Self::SLOTS {
            self.0[slot / 64] |= 1 << (slot % 64);
        }
    }

    /// Removes `slot`.
    pub fn remove(&mut self, slot: usize) {
        if slot < Self::SLOTS {
            self.0[slot / 64] &= !(1 << (slot % 64));
        }
    }

    /// Whether no slot is in the mask.
    pub fn is_empty(&self) -> bool {
        self.0.iter().all(|&w| w == 0)
    }

    /// Whether the two masks share a slot.
    pub fn intersects(&self, other: Self) -> bool {
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
    pub fn slots(self) -> Slots<W> {
        Slots(self)
    }

    /// The mask of `word` placed at 64-slot window `w` (slots `64 w ..
    /// 64 w + 63`); empty past the width.
    pub fn from_window(w: usize, word: u64) -> Self {
        let mut m = Self::EMPTY;
        if let Some(x) = m.0.get_mut(w) {
            *x = word;
        }
        m
    }

    /// The window and word of a mask whose slots lie in one 64-slot
    /// window; `None` for the empty mask and for one spanning windows.
    pub fn single_window(&self) -> Option<(usize, u64)> {
        let mut it = self.0.iter().enumerate().filter(|(_, &w)| w != 0);
        let (w, &word) = it.next()?;
        if it.next().is_some() {
            return None;
        }
        Some((w, word))
    }

    /// The mask's non-empty windows, lowest first: `(window, word)`.
    pub fn windows(self) -> impl Iterator<Item = (usize, u64)> {
        self.0.into_iter().enumerate().filter(|&(_, w)| w != 0)
    }
}

/// Iterator over a mask's slots (`WideMask::slots`).
#[derive(Debug, Clone)]
pub struct Slots<const W: usize>(WideMask<W>);

impl<const W: usize> Iterator for Slots<W> {
    type Item = usize;

    fn next(&mut self) -> Option<usize> {
        let s = self.0.lowest()?;
        self.0.remove(s);
        Some(s)
    }
}

impl<const W: usize> BitOr for WideMask<W> {
    type Output = Self;
    fn bitor(mut self, o: Self) -> Self {
        self |= o;
        self
    }
}

impl<const W: usize> BitOrAssign for WideMask<W> {
    fn bitor_assign(&mut self, o: Self) {
        for (a, b) in self.0.iter_mut().zip(o.0) {
            *a |= b;
        }
    }
}

impl<const W: usize> BitAnd for WideMask<W> {
    type Output = Self;
    fn bitand(mut self, o: Self) -> Self {
        self &= o;
        self
    }
}

impl<const W: usize> BitAndAssign for WideMask<W> {
    fn bitand_assign(&mut self, o: Self) {
        for (a, b) in self.0.iter_mut().zip(o.0) {
            *a &= b;
        }
    }
}

impl<const W: usize> Not for WideMask<W> {
    type Output = Self;
    fn not(mut self) -> Self {
        for a in &mut self.0 {
            *a = !*a;
        }
        self
    }
}

impl<const W: usize> core::fmt::LowerHex for WideMask<W> {
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

    /// 1024 slots (16 words): what a 1024-snapshot table needs.
    #[test]
    fn sixteen_words_hold_1024_slots() {
        type M = WideMask<16>;
        assert_eq!(M::SLOTS, 1024);
        let mut m = M::EMPTY;
        for s in [0, 63, 64, 511, 1000, 1023] {
            m.insert(s);
        }
        m.insert(1024); // ignored
        assert_eq!(m.count(), 6);
        assert_eq!(m.slots().collect::<Vec<_>>(), [0, 63, 64, 511, 1000, 1023]);
        assert!(m.contains(1023) && !m.contains(1022) && !m.contains(1024));
        let hi = M::bit(1000) | M::bit(1023);
        assert_eq!((m & !hi).slots().collect::<Vec<_>>(), [0, 63, 64, 511]);
        assert!(m.intersects(hi) && !(m & !hi).intersects(hi));
        assert_eq!(M::bit(700).single(), Some(700));
        assert_eq!((M::bit(700) | M::bit(2)).single(), None);
        assert_eq!((M::bit(700) | M::bit(2)).lowest(), Some(2));
        assert_eq!((!M::EMPTY).count(), 1024);
        assert_eq!(
            format!("{:#x}", M::bit(64) | M::bit(0)),
            "0x10000000000000001"
        );
        m.remove(0);
        m.remove(1023);
        assert_eq!(m.lowest(), Some(63));
        assert_eq!(m.count(), 4);
    }
}
