//! A disk that fails (#15): EIO on a read, a write or a flush, ENOSPC on a
//! write, and a torn write, injected at every disk operation of a workload
//! in turn; and a second failure at every write of the replay that follows;
//! and a crash (the write and everything after it lost, with or without the
//! writes since the last flush) at every write of a replay, and of a
//! standby's claiming start (claim, replay, incarnation bump), and of a run
//! under the `delete-lowest-priority` store-full policy (victims chosen,
//! deleted in steps, copy-outs after them).
//!
//! What must hold after each: the store operation that met the failure
//! returns an error (no panic), nothing it acknowledged (a commit that
//! returned `Ok`) is lost, and once the disk works again the store opens,
//! `check` is clean and every volume reads as the model says.

#![allow(clippy::cast_possible_truncation)]

mod common;

use common::{
    format_store, format_store_v1, initial, make_origin, pattern, value_of, CACHE_BLOCKS, CHUNK,
};
use csnap_store::disk::{Disk, DiskError, MemDisk};
use csnap_store::{Mapping, OpenOptions, OriginWrite, Store, StoreError, StoreFullPolicy};

const ORIGIN_CHUNKS: u64 = 48;
const DATA_CHUNKS: u64 = 256;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    ReadEio,
    WriteEio,
    WriteEnospc,
    FlushEio,
    TornWrite,
}

const FAULTS: [Fault; 5] = [
    Fault::ReadEio,
    Fault::WriteEio,
    Fault::WriteEnospc,
    Fault::FlushEio,
    Fault::TornWrite,
];

/// A disk whose `at`-th operation of the fault's kind fails (once).
struct FaultDisk {
    inner: MemDisk,
    fault: Option<Fault>,
    at: u64,
    seen: u64,
    fired: bool,
}

impl FaultDisk {
    fn new(inner: MemDisk, fault: Option<Fault>, at: u64) -> Self {
        FaultDisk {
            inner,
            fault,
            at,
            seen: 0,
            fired: false,
        }
    }

    /// Whether this operation (of `kind`) is the one that fails.
    fn hit(&mut self, kinds: &[Fault]) -> Option<Fault> {
        let f = self.fault?;
        if self.fired || !kinds.contains(&f) {
            return None;
        }
        self.seen += 1;
        if self.seen == self.at {
            self.fired = true;
            return Some(f);
        }
        None
    }
}

impl Disk for FaultDisk {
    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> Result<(), DiskError> {
        if self.hit(&[Fault::ReadEio]).is_some() {
            return Err(DiskError::Os(libc::EIO));
        }
        self.inner.read_at(buf, offset)
    }

    fn write_at(&mut self, buf: &[u8], offset: u64) -> Result<(), DiskError> {
        match self.hit(&[Fault::WriteEio, Fault::WriteEnospc, Fault::TornWrite]) {
            Some(Fault::WriteEio) => Err(DiskError::Os(libc::EIO)),
            Some(Fault::WriteEnospc) => Err(DiskError::Os(libc::ENOSPC)),
            Some(_) => {
                // Torn: the first half (rounded to 512 bytes) lands, then
                // the device fails.
                let half = (buf.len() / 2) / 512 * 512;
                self.inner.write_at(&buf[..half], offset)?;
                Err(DiskError::Os(libc::EIO))
            }
            None => self.inner.write_at(buf, offset),
        }
    }

    fn flush(&mut self) -> Result<(), DiskError> {
        if self.hit(&[Fault::FlushEio]).is_some() {
            return Err(DiskError::Os(libc::EIO));
        }
        self.inner.flush()
    }

    fn size_bytes(&self) -> u64 {
        self.inner.size_bytes()
    }
}

fn open_opts() -> OpenOptions {
    OpenOptions {
        cache_blocks: CACHE_BLOCKS,
    }
}

/// The model of what a workload acknowledged: origin values, and the
/// snapshots (each holding the origin as of its creation).
#[derive(Clone, Default)]
struct Acked {
    origin: Vec<u64>,
    snaps: Vec<(u32, Vec<u64>)>,
}

/// One step of the workload, as a server runs it: copy-out and commit, and
/// only then the origin write and the acknowledgement. Errors stop it.
fn step<D: Disk>(
    st: &mut Store<D>,
    origin: &mut MemDisk,
    acked: &mut Acked,
    i: u64,
) -> Result<(), StoreError> {
    if i % 9 == 4 {
        let tag = u32::try_from(10 + i).unwrap();
        st.create_snapshot(tag, 0)?;
        st.commit()?;
        acked.snaps.push((tag, acked.origin.clone()));
        return Ok(());
    }
    if i % 13 == 7 && acked.snaps.len() > 1 {
        let (tag, _) = acked.snaps.remove(0);
        st.delete_snapshot(tag)?;
        st.commit()?;
        return Ok(());
    }
    let c = (i * 7) % ORIGIN_CHUNKS;
    let v = 5_000 + i;
    match st.prepare_origin_write(c)? {
        OriginWrite::Unique => {}
        OriginWrite::CopyOut { store_chunk } => {
            let mut b = vec![0u8; CHUNK];
            origin.read_at(&mut b, c * CHUNK as u64).unwrap();
            let off = st.chunk_offset(store_chunk);
            st.write_data(&b, off)?;
        }
    }
    st.commit()?;
    // Acknowledged: the origin write follows the commit.
    origin.write_at(&pattern(v), c * CHUNK as u64).unwrap();
    acked.origin[usize::try_from(c).unwrap()] = v;
    Ok(())
}

const STEPS: u64 = 40;

/// Runs the workload until it ends or an operation fails; returns the
/// store's disk, the origin and what was acknowledged, and whether a
/// failure stopped it.
fn run(fault: Option<Fault>, at: u64) -> (FaultDisk, MemDisk, Acked, bool) {
    let d = format_store(ORIGIN_CHUNKS, DATA_CHUNKS, StoreFullPolicy::Refuse);
    let mut origin = make_origin(ORIGIN_CHUNKS);
    let mut acked = Acked {
        origin: (0..ORIGIN_CHUNKS).map(initial).collect(),
        snaps: Vec::new(),
    };
    let mut st = Store::open(FaultDisk::new(d, None, 0), &open_opts()).unwrap();
    st.create_snapshot(1, 0).unwrap();
    st.commit().unwrap();
    acked.snaps.push((1, acked.origin.clone()));
    // Armed from here on.
    let mut disk = st.into_disk();
    disk.fault = fault;
    disk.at = at;
    let mut failed = false;
    // The open itself (a standby's start) may meet the failure: an error.
    match Store::open(&mut disk, &open_opts()) {
        Err(_) => failed = true,
        Ok(mut st) => {
            for i in 0..STEPS {
                if step(&mut st, &mut origin, &mut acked, i).is_err() {
                    failed = true;
                    break;
                }
            }
        }
    }
    (disk, origin, acked, failed)
}

/// Opens the store on the working disk and checks it against the model.
fn recover_and_verify(d: MemDisk, origin: &mut MemDisk, acked: &Acked, what: &str) {
    let mut d = d;
    let r = csnap_store::check::check(&mut d);
    assert!(r.is_clean(), "{what}: check:\n{}", r.problems.join("\n"));
    let mut st = Store::open(d, &open_opts()).unwrap_or_else(|e| panic!("{what}: reopen: {e}"));
    for c in 0..ORIGIN_CHUNKS {
        let mut b = vec![0u8; CHUNK];
        origin.read_at(&mut b, c * CHUNK as u64).unwrap();
        assert_eq!(
            value_of(&b),
            Some(acked.origin[usize::try_from(c).unwrap()]),
            "{what}: origin chunk {c}"
        );
    }
    for (tag, data) in &acked.snaps {
        for c in 0..ORIGIN_CHUNKS {
            let mut b = vec![0u8; CHUNK];
            match st
                .lookup(*tag, c)
                .unwrap_or_else(|e| panic!("{what}: snapshot {tag} lost: {e}"))
            {
                Mapping::Origin => origin.read_at(&mut b, c * CHUNK as u64).unwrap(),
                Mapping::Store(s) => {
                    let off = st.chunk_offset(s);
                    st.read_data(&mut b, off).unwrap();
                }
            }
            assert_eq!(
                value_of(&b),
                Some(data[usize::try_from(c).unwrap()]),
                "{what}: snapshot {tag} chunk {c}"
            );
        }
    }
}

/// Operations of each fault kind in a fault-free run (where to inject).
fn ops_of(kind: Fault) -> u64 {
    let (d, _, _, failed) = run(Some(kind), u64::MAX);
    assert!(!failed);
    d.seen
}

#[test]
fn every_disk_failure_is_an_error_and_loses_nothing_acknowledged() {
    let mut injected = 0u64;
    let mut stopped = 0u64;
    for kind in FAULTS {
        let n = ops_of(kind);
        assert!(n > 10, "{kind:?}: only {n} operations to fail");
        for at in 1..=n {
            let (d, mut origin, acked, failed) = run(Some(kind), at);
            assert!(d.fired, "{kind:?} at {at} did not fire");
            injected += 1;
            // A failed write, flush or torn write always stops the server;
            // a failed read stops the request (here, the workload).
            assert!(failed, "{kind:?} at {at}: the failure went unnoticed");
            stopped += 1;
            recover_and_verify(d.inner, &mut origin, &acked, &format!("{kind:?} at {at}"));
        }
    }
    eprintln!("disk faults: {injected} injected, {stopped} stopped the workload, all recovered");
    assert!(injected > 100);
}

/// A second failure during the replay of the first: the open fails with an
/// error, and a later open on a working disk still recovers everything.
#[test]
fn a_failure_during_replay_is_an_error_and_the_next_open_recovers() {
    let mut injected = 0u64;
    for kind in [Fault::TornWrite, Fault::WriteEio, Fault::FlushEio] {
        let n = ops_of(kind);
        for at in (1..=n).step_by(3) {
            let (d, mut origin, acked, _) = run(Some(kind), at);
            // Count the replay's writes, then fail each in turn.
            let mut probe = FaultDisk::new(d.inner.clone(), Some(Fault::WriteEio), u64::MAX);
            drop(Store::open(&mut probe, &open_opts()).unwrap());
            let replay_writes = probe.seen;
            for j in 1..=replay_writes {
                let mut again = FaultDisk::new(d.inner.clone(), Some(Fault::TornWrite), j);
                assert!(
                    Store::open(&mut again, &open_opts()).is_err(),
                    "{kind:?} at {at}, replay write {j}: the open went on after a failed write"
                );
                injected += 1;
                recover_and_verify(
                    again.inner,
                    &mut origin.clone(),
                    &acked,
                    &format!("{kind:?} at {at}, replay write {j} torn"),
                );
            }
            recover_and_verify(d.inner, &mut origin, &acked, &format!("{kind:?} at {at}"));
        }
    }
    eprintln!("replay faults: {injected} injected");
    assert!(injected > 0, "no replay ever wrote");
}

// -- crashes in the windows the prefix crash tests leave out -------------------

/// A disk that crashes at its `crash_at`-th write: that write does not land,
/// nor does anything after it (every later operation fails, as the process
/// is gone); with `drop_unflushed`, the writes since the last flush are lost
/// too (the device never persisted its cache).
struct CrashDisk {
    inner: MemDisk,
    crash_at: u64,
    drop_unflushed: bool,
    writes: u64,
    crashed: bool,
    undo: Vec<(u64, Vec<u8>)>,
}

impl CrashDisk {
    fn new(inner: MemDisk, crash_at: u64, drop_unflushed: bool) -> Self {
        CrashDisk {
            inner,
            crash_at,
            drop_unflushed,
            writes: 0,
            crashed: false,
            undo: Vec::new(),
        }
    }

    /// What the device holds after the crash (or now).
    fn image(mut self) -> MemDisk {
        if self.crashed && self.drop_unflushed {
            while let Some((off, old)) = self.undo.pop() {
                self.inner.write_at(&old, off).unwrap();
            }
        }
        self.inner
    }
}

impl Disk for CrashDisk {
    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> Result<(), DiskError> {
        if self.crashed {
            return Err(DiskError::Os(libc::EIO));
        }
        self.inner.read_at(buf, offset)
    }

    fn write_at(&mut self, buf: &[u8], offset: u64) -> Result<(), DiskError> {
        if self.crashed {
            return Err(DiskError::Os(libc::EIO));
        }
        self.writes += 1;
        if self.writes == self.crash_at {
            self.crashed = true;
            return Err(DiskError::Os(libc::EIO));
        }
        let mut old = vec![0u8; buf.len()];
        self.inner.read_at(&mut old, offset)?;
        self.undo.push((offset, old));
        self.inner.write_at(buf, offset)
    }

    fn flush(&mut self) -> Result<(), DiskError> {
        if self.crashed {
            return Err(DiskError::Os(libc::EIO));
        }
        self.undo.clear();
        self.inner.flush()
    }

    fn size_bytes(&self) -> u64 {
        self.inner.size_bytes()
    }
}

/// Images a failed workload leaves behind (a journal to replay), with what
/// was acknowledged.
fn failed_images() -> Vec<(String, MemDisk, MemDisk, Acked)> {
    let mut v = Vec::new();
    for kind in [Fault::TornWrite, Fault::FlushEio] {
        let n = ops_of(kind);
        for at in (1..=n).step_by(4) {
            let (d, origin, acked, _) = run(Some(kind), at);
            v.push((format!("{kind:?} at {at}"), d.inner, origin, acked));
        }
    }
    v
}

/// A crash at every write of the replay (a standby's start after a
/// failure), with or without the writes since the last flush: the replay
/// after it recovers everything acknowledged, and `check` is clean.
#[test]
fn a_crash_at_every_write_of_the_replay_then_replay_again_loses_nothing() {
    let mut crashes = 0u64;
    for (what, d, origin, acked) in failed_images() {
        let mut probe = CrashDisk::new(d.clone(), u64::MAX, false);
        drop(Store::open(&mut probe, &open_opts()).unwrap());
        for j in 1..=probe.writes {
            for drop_unflushed in [false, true] {
                let mut cd = CrashDisk::new(d.clone(), j, drop_unflushed);
                assert!(
                    Store::open(&mut cd, &open_opts()).is_err(),
                    "{what}: the replay went on after its crash at write {j}"
                );
                crashes += 1;
                recover_and_verify(
                    cd.image(),
                    &mut origin.clone(),
                    &acked,
                    &format!(
                        "{what}, replay crashed at write {j} (unflushed lost: {drop_unflushed})"
                    ),
                );
            }
        }
    }
    eprintln!("replay crashes: {crashes}");
    assert!(crashes > 50, "only {crashes} replay crashes");
}

/// A crash at every write of a standby's start that claims the store (the
/// claim's superblock write, the replay, the incarnation bump's commit):
/// nothing acknowledged is lost, `check` is clean, and the incarnation never
/// goes back: the next start's is above every one a server used before.
#[test]
fn a_crash_at_every_write_of_a_claiming_start_loses_nothing_and_keeps_incarnations_rising() {
    let mut crashes = 0u64;
    let mut images = failed_images();
    // And a cleanly stopped store.
    let (d, origin, acked, failed) = run(None, 0);
    assert!(!failed);
    images.push(("clean".into(), d.inner, origin, acked));
    for (what, d, origin, acked) in images {
        let before = {
            let st = Store::open(d.clone(), &open_opts()).unwrap();
            st.incarnation()
        };
        let start = |disk: &mut CrashDisk| -> Result<u64, StoreError> {
            let mut sb = csnap_store::Standby::reserve(disk, &open_opts())?;
            sb.claim(std::time::Duration::ZERO)?;
            let mut st = sb.try_start().map_err(|(_, e)| e)?;
            st.bump_incarnation()
        };
        let mut probe = CrashDisk::new(d.clone(), u64::MAX, false);
        let inc = start(&mut probe).unwrap();
        assert!(inc > before, "{what}: start took {inc}, before {before}");
        for j in 1..=probe.writes {
            for drop_unflushed in [false, true] {
                let mut cd = CrashDisk::new(d.clone(), j, drop_unflushed);
                assert!(
                    start(&mut cd).is_err(),
                    "{what}: the start went on after its crash at write {j}"
                );
                crashes += 1;
                let img = cd.image();
                let ctx = format!(
                    "{what}, start crashed at write {j} (unflushed lost: {drop_unflushed})"
                );
                recover_and_verify(img.clone(), &mut origin.clone(), &acked, &ctx);
                let mut st = Store::open(img, &open_opts()).unwrap();
                let next = st.bump_incarnation().unwrap();
                assert!(
                    next > before,
                    "{ctx}: the next start took {next}, not above {before}"
                );
            }
        }
    }
    eprintln!("start crashes: {crashes}");
    assert!(crashes > 50, "only {crashes} start crashes");
}

/// A store formatted before #13 (its snapshot table inside a version-1
/// superblock) is read as it is, and its first commit after an open moves
/// the table into table blocks (a version-2 superblock). A crash at every
/// write of that commit, with or without the unflushed writes, leaves a
/// store of one version or the other that `check` finds clean and that
/// holds everything acknowledged; the next open and commit upgrade it.
#[test]
fn a_version_1_store_is_upgraded_in_place_and_a_crash_at_every_write_of_the_upgrade_loses_nothing()
{
    let super_version = |d: &mut MemDisk| {
        let mut b = vec![0u8; CHUNK];
        d.read_at(&mut b[..4096], csnap_store::layout::SUPER_BLOCK * 4096)
            .unwrap();
        csnap_store::layout::version(&b[..4096])
    };
    let mut origin = make_origin(ORIGIN_CHUNKS);
    let mut acked = Acked {
        origin: (0..ORIGIN_CHUNKS).map(initial).collect(),
        snaps: Vec::new(),
    };
    // Populated as version 1: the open's pending upgrade is dropped
    // (`abort`), so the store runs as csnap before #13 ran it.
    let d = format_store_v1(ORIGIN_CHUNKS, DATA_CHUNKS, StoreFullPolicy::Refuse);
    let mut st = Store::open(d, &open_opts()).unwrap();
    assert!(
        st.is_dirty(),
        "the open of a version-1 store stages its upgrade"
    );
    st.abort();
    st.create_snapshot(1, 0).unwrap();
    st.commit().unwrap();
    acked.snaps.push((1, acked.origin.clone()));
    for i in 0..STEPS {
        step(&mut st, &mut origin, &mut acked, i).unwrap();
    }
    assert!(acked.snaps.len() >= 2);
    let mut d = st.into_disk();
    assert_eq!(super_version(&mut d), 1);
    recover_and_verify(d.clone(), &mut origin.clone(), &acked, "version 1");
    let upgrade = |disk: &mut CrashDisk| -> Result<(), StoreError> {
        let mut st = Store::open(disk, &open_opts())?;
        st.commit()?;
        Ok(())
    };
    let mut probe = CrashDisk::new(d.clone(), u64::MAX, false);
    upgrade(&mut probe).unwrap();
    let mut up = probe.image();
    assert_eq!(super_version(&mut up), 2, "the first commit upgrades");
    recover_and_verify(up, &mut origin.clone(), &acked, "upgraded");
    let writes = CrashDisk::new(d.clone(), u64::MAX, false);
    let mut counter = writes;
    upgrade(&mut counter).unwrap();
    let (mut crashes, mut v1, mut v2) = (0, 0, 0);
    for j in 1..=counter.writes {
        for drop_unflushed in [false, true] {
            let mut cd = CrashDisk::new(d.clone(), j, drop_unflushed);
            assert!(upgrade(&mut cd).is_err(), "no crash at write {j}");
            crashes += 1;
            let ctx = format!("upgrade crashed at write {j} (unflushed lost: {drop_unflushed})");
            // Replay decides the version (and writes the home copies a
            // crash after the journal write left unwritten: until then
            // `check` reports them, with the journal's good copy).
            let st = Store::open(cd.image(), &open_opts()).unwrap();
            let mut img = st.into_disk();
            if super_version(&mut img) == 2 {
                v2 += 1;
            } else {
                v1 += 1;
            }
            recover_and_verify(img.clone(), &mut origin.clone(), &acked, &ctx);
            let mut st = Store::open(&mut img, &open_opts()).unwrap();
            st.commit().unwrap();
            drop(st);
            assert_eq!(
                super_version(&mut img),
                2,
                "{ctx}: upgraded by the next commit"
            );
            recover_and_verify(
                img,
                &mut origin.clone(),
                &acked,
                &format!("{ctx}, then upgraded"),
            );
        }
    }
    eprintln!("upgrade crashes: {crashes} ({v1} left version 1, {v2} version 2)");
    assert!(
        v1 > 0 && v2 > 0,
        "crashes on both sides of the commit point"
    );
}

/// The `delete-lowest-priority` workload: snapshots with priorities taken
/// while the origin is rewritten on a store too small for all their
/// copy-outs, so the policy deletes victims (commit, delete steps, retry, as
/// the store worker does). Returns what was acknowledged and the victims
/// chosen so far (only those may be missing after a crash).
fn auto_delete_workload<D: Disk>(
    st: &mut Store<D>,
    origin: &mut MemDisk,
    acked: &mut Acked,
    victims: &mut Vec<u32>,
) -> Result<(), StoreError> {
    for i in 0..72u64 {
        if i % 12 == 0 {
            let tag = u32::try_from(100 + i).unwrap();
            st.create_snapshot(tag, 0)?;
            st.set_priority(tag, i8::try_from(i % 5).unwrap())?;
            st.commit()?;
            acked.snaps.push((tag, acked.origin.clone()));
            continue;
        }
        let c = (i * 5) % ORIGIN_CHUNKS;
        let v = 9_000 + i;
        let w = loop {
            match st.prepare_origin_write(c) {
                Ok(w) => break w,
                Err(StoreError::Reclaiming { victim }) => {
                    if let Some(t) = victim {
                        victims.push(t);
                    }
                    st.commit()?;
                    while st.delete_step(64)? != csnap_store::DeleteProgress::Idle {
                        st.commit()?;
                    }
                    st.commit()?;
                }
                Err(e) => return Err(e),
            }
        };
        if let OriginWrite::CopyOut { store_chunk } = w {
            let mut b = vec![0u8; CHUNK];
            origin.read_at(&mut b, c * CHUNK as u64).unwrap();
            let off = st.chunk_offset(store_chunk);
            st.write_data(&b, off)?;
        }
        st.commit()?;
        origin.write_at(&pattern(v), c * CHUNK as u64).unwrap();
        acked.origin[usize::try_from(c).unwrap()] = v;
    }
    Ok(())
}

/// A crash at every write of a run under `delete-lowest-priority` (the
/// victims' marking, their delete steps, the copy-outs after them): the
/// store recovers with `check` clean, the origin as acknowledged, and every
/// snapshot either reading exactly its data or gone, and gone only if the
/// policy had chosen it.
#[test]
fn a_crash_at_every_write_under_delete_lowest_priority_loses_nothing_acknowledged() {
    let base = format_store(ORIGIN_CHUNKS, 40, StoreFullPolicy::DeleteLowestPriority);
    let fresh = || Acked {
        origin: (0..ORIGIN_CHUNKS).map(initial).collect(),
        snaps: Vec::new(),
    };
    // The whole run, to count its writes and see the policy act.
    let mut probe = CrashDisk::new(base.clone(), u64::MAX, false);
    let (mut acked, mut victims) = (fresh(), Vec::new());
    {
        let mut st = Store::open(&mut probe, &open_opts()).unwrap();
        auto_delete_workload(
            &mut st,
            &mut make_origin(ORIGIN_CHUNKS),
            &mut acked,
            &mut victims,
        )
        .unwrap();
    }
    assert!(victims.len() >= 2, "the policy chose {victims:?}");
    let writes = probe.writes;
    let mut crashes = 0u64;
    for j in 1..=writes {
        for drop_unflushed in [false, true] {
            let mut cd = CrashDisk::new(base.clone(), j, drop_unflushed);
            let mut origin = make_origin(ORIGIN_CHUNKS);
            let (mut acked, mut victims) = (fresh(), Vec::new());
            let r = match Store::open(&mut cd, &open_opts()) {
                Ok(mut st) => auto_delete_workload(&mut st, &mut origin, &mut acked, &mut victims),
                Err(e) => Err(e),
            };
            assert!(r.is_err(), "write {j}: the run went on after its crash");
            crashes += 1;
            let what = format!("crash at write {j} of {writes} (unflushed lost: {drop_unflushed})");
            let mut d = cd.image();
            let rep = csnap_store::check::check(&mut d);
            assert!(
                rep.is_clean(),
                "{what}: check:\n{}",
                rep.problems.join("\n")
            );
            let mut st =
                Store::open(d, &open_opts()).unwrap_or_else(|e| panic!("{what}: reopen: {e}"));
            for c in 0..ORIGIN_CHUNKS {
                let mut b = vec![0u8; CHUNK];
                origin.read_at(&mut b, c * CHUNK as u64).unwrap();
                assert_eq!(
                    value_of(&b),
                    Some(acked.origin[c as usize]),
                    "{what}: origin chunk {c}"
                );
            }
            for (tag, data) in &acked.snaps {
                if st.snapshot(*tag).is_none() {
                    assert!(
                        victims.contains(tag),
                        "{what}: snapshot {tag} lost, never a victim ({victims:?})"
                    );
                    continue;
                }
                for c in 0..ORIGIN_CHUNKS {
                    let mut b = vec![0u8; CHUNK];
                    match st.lookup(*tag, c).unwrap() {
                        Mapping::Origin => origin.read_at(&mut b, c * CHUNK as u64).unwrap(),
                        Mapping::Store(s) => {
                            let off = st.chunk_offset(s);
                            st.read_data(&mut b, off).unwrap();
                        }
                    }
                    assert_eq!(
                        value_of(&b),
                        Some(data[c as usize]),
                        "{what}: snapshot {tag} chunk {c}"
                    );
                }
            }
        }
    }
    eprintln!(
        "delete-lowest-priority: {crashes} crashes over {writes} writes, victims {victims:?}"
    );
    assert!(crashes > 100);
}
