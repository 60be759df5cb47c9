//! Fencing: the incarnation bump at takeover, the fence read that finds a
//! newer incarnation, and the lease that bounds writes after a good read.

use crate::*;

impl<D: Disk> Store<D> {
    /// Takes the next incarnation (in the open transaction; commit it before
    /// serving).
    pub fn bump_incarnation(&mut self) -> Result<u64, StoreError> {
        self.begin_op()?;
        self.sb.incarnation += 1;
        let inc = self.sb.incarnation;
        self.end_op(Ok(inc), true)
    }

    /// Reads the home superblock and fails with `Fenced` if another server
    /// has taken the next incarnation (or is rewriting the superblock). Run
    /// by every commit before it writes anything. On a shared block device
    /// this must bypass the page cache (O_DIRECT) to see other nodes' writes.
    pub fn check_fence(&mut self) -> Result<(), StoreError> {
        let began = self.lease.map(|_| std::time::Instant::now());
        let ours = self.committed.incarnation.max(self.sb.incarnation);
        self.disk
            .read_at(&mut self.fence_buf, layout::SUPER_BLOCK * BS)?;
        let found = match layout::verify(&self.fence_buf, layout::SUPER_BLOCK, BlockKind::Super) {
            Ok(_) => Super::decode(&self.fence_buf).map_or(0, |sb| sb.incarnation),
            Err(_) => 0,
        };
        if found == 0 && self.committed.seq == 0 {
            // A freshly formatted store's superblock says incarnation 0.
            self.fence_ok_at = began;
            return Ok(());
        }
        if found > ours || (found == 0 && ours > 0) {
            return Err(StoreError::Fenced { ours, found });
        }
        self.fence_ok_at = began;
        Ok(())
    }

    /// Gives the store a lease (a serving server's, `SERVER_LEASE_MS`):
    /// from now on every write of the device (journal, home blocks,
    /// `write_data`) is made only within `lease` of the start of a fence
    /// read that found no newer incarnation, and reads the fence again
    /// first when it is older. Without one (tools, simulations) only the
    /// commit's own fence read guards the writes.
    pub fn set_lease(&mut self, lease: std::time::Duration) {
        self.lease = Some(lease);
        self.fence_ok_at = None;
    }

    /// Renews the lease when it ran out (see `set_lease`); `Fenced` when a
    /// newer incarnation has the store.
    pub(crate) fn within_lease(&mut self) -> Result<(), StoreError> {
        let Some(lease) = self.lease else {
            return Ok(());
        };
        if self.fence_ok_at.is_none_or(|t| t.elapsed() >= lease) {
            self.check_fence()?;
        }
        Ok(())
    }
}
