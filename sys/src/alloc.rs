//! The sealed heap: a global allocator over the system allocator with three
//! phases.
//!
//! - **Init**: everything is allowed; pools are reserved.
//! - **Sealed**: the serving phase. Any allocation, reallocation or free is a
//!   violation. In `Abort` mode it writes a message naming the phase and the
//!   size to stderr (with `write(2)`, which does not allocate) and aborts the
//!   process; in `Count` mode it is counted (and served), so a test can assert
//!   the count is zero; in `Report` mode it is counted and a backtrace of the
//!   call site is printed (the report itself allocates, with the check
//!   suspended), for finding the offender.
//! - **Teardown**: everything is allowed again (shutdown).
//!
//! Install it in a binary with
//! `#[global_allocator] static A: csnap_sys::alloc::SealedAlloc = SealedAlloc::new();`
//! and call `seal` once the pools exist.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};

/// Allocation phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Phase {
    /// Pools are being reserved.
    Init = 0,
    /// Serving: no allocation allowed.
    Sealed = 1,
    /// Shutting down.
    Teardown = 2,
}

/// What a sealed allocation does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Mode {
    /// Abort the process with a message (production).
    Abort = 0,
    /// Count it and serve it (tests).
    Count = 1,
    /// Count it, print a backtrace, serve it (finding the call site).
    Report = 2,
}

static PHASE: crate::phase::PhaseCell = crate::phase::PhaseCell::new();
static MODE: AtomicU8 = AtomicU8::new(Mode::Abort as u8);
static SEALED_ALLOCS: AtomicU64 = AtomicU64::new(0);
static SEALED_FREES: AtomicU64 = AtomicU64::new(0);
static REPORTING: AtomicBool = AtomicBool::new(false);

/// The allocator.
#[derive(Debug)]
pub struct SealedAlloc;

impl SealedAlloc {
    /// The allocator value for `#[global_allocator]`.
    pub const fn new() -> Self {
        SealedAlloc
    }
}

impl Default for SealedAlloc {
    fn default() -> Self {
        Self::new()
    }
}

/// The current phase.
pub fn phase() -> Phase {
    match PHASE.get() {
        0 => Phase::Init,
        1 => Phase::Sealed,
        _ => Phase::Teardown,
    }
}

/// Seals the heap. Asserts the previous phase was Init.
pub fn seal(mode: Mode) {
    MODE.store(mode as u8, Ordering::SeqCst);
    let prev = PHASE.seal();
    assert_eq!(prev, Phase::Init as u8, "seal from a phase other than init");
}

/// Enters teardown (allocation allowed again).
pub fn teardown() {
    PHASE.teardown();
}

/// Allocations (and reallocations) made while sealed.
pub fn sealed_allocations() -> u64 {
    SEALED_ALLOCS.load(Ordering::SeqCst)
}

/// Frees made while sealed.
pub fn sealed_frees() -> u64 {
    SEALED_FREES.load(Ordering::SeqCst)
}

fn write_stderr(parts: &[&[u8]]) {
    for p in parts {
        // SAFETY: `p` is a live byte slice; write(2) reads at most `p.len()`
        // bytes from it and keeps no reference. A short or failed write only
        // loses diagnostics.
        let _ = unsafe { libc::write(2, p.as_ptr().cast(), p.len()) };
    }
}

fn fmt_u64(mut v: u64, buf: &mut [u8; 20]) -> &[u8] {
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    &buf[i..]
}

fn violation(what: &[u8], size: usize) {
    let mode = MODE.load(Ordering::SeqCst);
    if what == b"free" {
        SEALED_FREES.fetch_add(1, Ordering::SeqCst);
    } else {
        SEALED_ALLOCS.fetch_add(1, Ordering::SeqCst);
    }
    if mode == Mode::Count as u8 {
        return;
    }
    let mut nb = [0u8; 20];
    let n = fmt_u64(size as u64, &mut nb);
    write_stderr(&[
        b"csnap: heap violation: ",
        what,
        b" of ",
        n,
        b" bytes in the sealed phase (serving must not allocate)\n",
    ]);
    if mode == Mode::Abort as u8 {
        // Not `abort`: its rt_sigprocmask and tgkill are outside the
        // serving whitelists, and the report above would be followed by
        // "forbidden syscall". `_exit` is `exit_group` only.
        crate::exit_now(HEAP_VIOLATION_EXIT_STATUS);
    }
    // Report: a backtrace of the call site; suspend the check meanwhile.
    if !REPORTING.swap(true, Ordering::SeqCst) {
        let bt = std::backtrace::Backtrace::force_capture();
        eprintln!("{bt}");
        REPORTING.store(false, Ordering::SeqCst);
    }
}

fn sealed() -> bool {
    PHASE.is_sealed() && !REPORTING.load(Ordering::Relaxed)
}

/// Exit status of a process that allocated in the sealed phase (abort mode).
pub const HEAP_VIOLATION_EXIT_STATUS: u8 = 134;

/// Bytes of the panic arena: what std allocates for a panic's formatted
/// message (and its payload box) on the way to the panic hook.
const PANIC_ARENA_BYTES: usize = csnap_pools::PANIC_ARENA_BYTES;

/// A static bump arena for allocations made while the thread panics in the
/// sealed phase: served without a syscall (the system allocator could
/// `brk` or `mmap`, outside the whitelist) and never freed (the panic hook
/// ends the process).
#[repr(C, align(64))]
struct PanicArena(std::cell::UnsafeCell<[u8; PANIC_ARENA_BYTES]>);

// SAFETY: the arena's bytes are handed out in disjoint pieces, each claimed
// once through the atomic `PANIC_ARENA_NEXT`; no two callers get the same
// bytes.
unsafe impl Sync for PanicArena {}

static PANIC_ARENA: PanicArena = PanicArena(std::cell::UnsafeCell::new([0; PANIC_ARENA_BYTES]));
static PANIC_ARENA_NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// True while this thread panics in the sealed phase: its allocations come
/// from the panic arena and its frees are dropped.
fn panicking_sealed() -> bool {
    PHASE.is_sealed() && std::thread::panicking()
}

fn panic_arena_alloc(layout: Layout) -> *mut u8 {
    let base = PANIC_ARENA.0.get().cast::<u8>() as usize;
    let mut cur = PANIC_ARENA_NEXT.load(Ordering::Relaxed);
    loop {
        let start = (base + cur).next_multiple_of(layout.align()) - base;
        let end = start.saturating_add(layout.size());
        if end > PANIC_ARENA_BYTES {
            return std::ptr::null_mut();
        }
        match PANIC_ARENA_NEXT.compare_exchange(cur, end, Ordering::SeqCst, Ordering::Relaxed) {
            // SAFETY: `start..end` lies inside the static arena (checked
            // above) and was claimed by this thread alone.
            Ok(_) => return unsafe { PANIC_ARENA.0.get().cast::<u8>().add(start) },
            Err(now) => cur = now,
        }
    }
}

fn in_panic_arena(ptr: *mut u8) -> bool {
    let base = PANIC_ARENA.0.get().cast::<u8>() as usize;
    (base..base + PANIC_ARENA_BYTES).contains(&(ptr as usize))
}

// SAFETY: every method forwards to the system allocator with the caller's
// arguments unchanged, so it upholds GlobalAlloc's contract exactly as System
// does, except while a sealed thread panics: then blocks come from the
// static panic arena (aligned as asked, disjoint, never reused) and frees
// are dropped, which is sound for a process the panic hook is about to end.
// The bookkeeping only touches atomics and write(2), neither of which
// allocates or unwinds.
unsafe impl GlobalAlloc for SealedAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if panicking_sealed() {
            return panic_arena_alloc(layout);
        }
        if sealed() {
            violation(b"allocation", layout.size());
        }
        // SAFETY: same contract as the caller's: layout has non-zero size.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if panicking_sealed() {
            // The arena is zeroed and never reused.
            return panic_arena_alloc(layout);
        }
        if sealed() {
            violation(b"allocation", layout.size());
        }
        // SAFETY: as for alloc.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if in_panic_arena(ptr) || panicking_sealed() {
            // Arena memory is never freed; a panicking sealed thread frees
            // nothing (the process is about to end).
            return;
        }
        if sealed() {
            violation(b"free", layout.size());
        }
        // SAFETY: ptr was returned by this allocator (which is System) with
        // this layout, as the caller guarantees.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if in_panic_arena(ptr) || panicking_sealed() {
            let Ok(new_layout) = Layout::from_size_align(new_size, layout.align()) else {
                return std::ptr::null_mut();
            };
            let new = panic_arena_alloc(new_layout);
            if !new.is_null() {
                // SAFETY: `ptr` holds `layout.size()` readable bytes (the
                // caller's contract), `new` is a fresh arena piece of
                // `new_size` bytes; the two do not overlap.
                unsafe { std::ptr::copy_nonoverlapping(ptr, new, layout.size().min(new_size)) };
            }
            return new;
        }
        if sealed() {
            violation(b"reallocation", new_size);
        }
        // SAFETY: as the caller guarantees for realloc.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

thread_local! {
    static THREAD_ALLOCS: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// A test allocator: the system allocator that counts, per thread, every
/// allocation and reallocation (`thread_allocs`). The tests of the pure
/// crates (`proto`, `fsm`) install it to show a code path allocates
/// nothing; it lives here so `unsafe` stays in `sys`.
///
/// `#[global_allocator] static A: csnap_sys::alloc::CountingAlloc = csnap_sys::alloc::CountingAlloc;`
#[derive(Debug, Clone, Copy, Default)]
pub struct CountingAlloc;

/// Allocations and reallocations made by this thread under
/// `CountingAlloc` so far.
pub fn thread_allocs() -> usize {
    THREAD_ALLOCS.with(std::cell::Cell::get)
}

// SAFETY: every method forwards to `System` with the caller's arguments
// unchanged, so `System`'s guarantees carry over; the thread-local counter
// has a const initializer and no destructor, so touching it never allocates
// or recurses into the allocator.
unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        THREAD_ALLOCS.with(|c| c.set(c.get() + 1));
        // SAFETY: the caller upholds `GlobalAlloc::alloc`'s contract.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` was allocated by `System` with `layout` (via `alloc`).
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        THREAD_ALLOCS.with(|c| c.set(c.get() + 1));
        // SAFETY: the caller upholds `GlobalAlloc::realloc`'s contract.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}
