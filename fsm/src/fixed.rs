//! Fixed-capacity queues reserved at init, shared by the state machines.

/// A fixed ring of `T`.
#[derive(Debug)]
pub struct FixedRing<T: Copy> {
    items: Vec<Option<T>>,
    head: usize,
    len: usize,
    dropped: u64,
}

impl<T: Copy> FixedRing<T> {
    /// Reserves `cap` slots. The only allocation.
    pub fn new(cap: usize) -> Self {
        FixedRing {
            items: vec![None; cap],
            head: 0,
            len: 0,
            dropped: 0,
        }
    }
    /// Appends, or counts the item as dropped when full (`dropped`): for
    /// queues of event lines, whose loss must not stop the machine.
    pub fn push_or_count(&mut self, t: T) {
        if !self.push(t) {
            self.dropped += 1;
        }
    }
    /// Items `push_or_count` dropped because the ring was full.
    pub fn dropped(&self) -> u64 {
        self.dropped
    }
    /// Appends; `false` when full.
    pub fn push(&mut self, t: T) -> bool {
        if self.len == self.items.len() {
            return false;
        }
        let i = (self.head + self.len) % self.items.len();
        self.items[i] = Some(t);
        self.len += 1;
        true
    }
    /// Removes the oldest.
    pub fn pop(&mut self) -> Option<T> {
        if self.len == 0 {
            return None;
        }
        let t = self.items[self.head].take();
        self.head = (self.head + 1) % self.items.len();
        self.len -= 1;
        t
    }
}

impl<T: Copy> FixedRing<T> {
    /// Items queued.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Slots reserved.
    pub fn capacity(&self) -> usize {
        self.items.len()
    }
}

/// A FIFO of connection slot ids `0..cap`, each queued at most once:
/// pushing an id already queued is a no-op, so it never fills. An entry
/// outlives the connection that queued it (a slot freed and taken again
/// keeps its place in the queue), so the consumer checks every id it pops
/// against the slot's state now.
#[derive(Debug)]
pub struct IdQueue {
    ring: FixedRing<u32>,
    queued: Vec<bool>,
}

impl IdQueue {
    /// Reserves room for the ids `0..cap`. The only allocation.
    pub fn new(cap: usize) -> Self {
        IdQueue {
            ring: FixedRing::new(cap),
            queued: vec![false; cap],
        }
    }

    /// Queues `id` unless it is queued already.
    pub fn push(&mut self, id: u32) {
        let i = id as usize;
        if !self.queued[i] {
            self.queued[i] = true;
            let room = self.ring.push(id);
            assert!(room, "an id queue holds every id once");
        }
    }

    /// The oldest queued id.
    pub fn pop(&mut self) -> Option<u32> {
        let id = self.ring.pop()?;
        self.queued[id as usize] = false;
        Some(id)
    }
}
