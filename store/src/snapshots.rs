//! The snapshot table: listing, creating, deleting (marking), priority and
//! the in-use marks.

use crate::*;

impl<D: Disk> Store<D> {
    /// Live and deleting snapshots, by share bit.
    pub fn snapshots(&self) -> impl Iterator<Item = SnapshotInfo> + '_ {
        self.sb
            .snaps
            .iter()
            .enumerate()
            .filter(|(_, s)| s.state != SlotState::Free)
            .map(|(i, s)| SnapshotInfo {
                tag: s.tag,
                bit: u16::try_from(i).unwrap_or(u16::MAX),
                priority: s.priority,
                ctime_secs: s.ctime_secs,
                chunks: s.chunks,
                unique_chunks: s.unique_chunks,
                deleting: s.state == SlotState::Deleting,
                in_use: self.in_use_mask.contains(i),
            })
    }

    /// The live snapshot with `tag`.
    pub fn snapshot(&self, tag: u32) -> Option<SnapshotInfo> {
        self.snapshots().find(|s| s.tag == tag && !s.deleting)
    }

    /// Marks a snapshot in use (a client has it open) or not. In use
    /// snapshots are never chosen by the store-full policy. Not persistent.
    pub fn set_in_use(&mut self, tag: u32, in_use: bool) -> Result<(), StoreError> {
        let bit = self
            .sb
            .live_bit(tag)
            .ok_or(StoreError::NoSuchSnapshot(tag))?;
        if in_use {
            self.in_use_mask.insert(bit);
        } else {
            self.in_use_mask.remove(bit);
        }
        Ok(())
    }

    /// Creates snapshot `tag`: instant, no tree work.
    pub fn create_snapshot(&mut self, tag: u32, now_secs: u64) -> Result<u16, StoreError> {
        self.begin_op()?;
        if self.sb.live_bit(tag).is_some() {
            return self.end_op(Err(StoreError::SnapshotExists(tag)), false);
        }
        // A store still holding its table in the superblock (version 1,
        // its upgrade refused for want of metadata blocks) has 64 slots.
        let slots = if self.sb.table_in_blocks() {
            SNAPSHOTS_MAX
        } else {
            64
        };
        let Some(bit) = self.sb.snaps[..slots]
            .iter()
            .position(|s| s.state == SlotState::Free)
        else {
            return self.end_op(Err(StoreError::TooManySnapshots), false);
        };
        self.sb.snaps[bit] = SnapSlot {
            tag,
            state: SlotState::Live,
            priority: 0,
            ctime_secs: now_secs,
            chunks: 0,
            unique_chunks: 0,
        };
        self.in_use_mask.remove(bit);
        self.end_op(Ok(u16::try_from(bit).unwrap_or(u16::MAX)), true)
    }

    /// Deletes snapshot `tag`: it disappears at once (atomically with the
    /// commit); its chunks are reclaimed by `delete_step`.
    pub fn delete_snapshot(&mut self, tag: u32) -> Result<(), StoreError> {
        self.begin_op()?;
        if self.sb.live_bit(tag).is_none() {
            return self.end_op(Err(StoreError::NoSuchSnapshot(tag)), false);
        }
        self.mark_deleted(tag);
        self.end_op(Ok(()), true)
    }

    pub(crate) fn mark_deleted(&mut self, tag: u32) {
        let Some(bit) = self.sb.live_bit(tag) else {
            return;
        };
        self.in_use_mask.remove(bit);
        if self.sb.snaps[bit].chunks == 0 {
            // Its bit is in no share mask: the slot is free at once.
            self.sb.snaps[bit] = SnapSlot::FREE;
            return;
        }
        self.sb.snaps[bit].state = SlotState::Deleting;
        if self.sb.delete_walk_mask.is_empty() {
            self.sb.delete_walk_mask = self.sb.deleting_mask();
            self.sb.delete_cursor = 0;
        }
    }

    /// Sets a snapshot's priority.
    pub fn set_priority(&mut self, tag: u32, priority: i8) -> Result<(), StoreError> {
        self.begin_op()?;
        let Some(bit) = self.sb.live_bit(tag) else {
            return self.end_op(Err(StoreError::NoSuchSnapshot(tag)), false);
        };
        self.sb.snaps[bit].priority = priority;
        self.end_op(Ok(()), true)
    }
}
