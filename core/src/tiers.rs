//! A two-tier item cache: fixed-size items (named by their content id) live either in a GPU
//! tier of `gpu_slots` slots or in a host tier (pinned or pageable memory) of `host_slots`
//! slots, and move between the two only by [`Decision::Transfer`].
//!
//! [`TierCache::access`] makes an item GPU-resident:
//! - on the GPU: a hit, read back (`ReadKv`) before it counts;
//! - on the host: restored by a host → GPU transfer, and its host slot freed (the tiers are
//!   exclusive: an item lives in exactly one);
//! - nowhere: written (`WriteKv`) into a GPU slot.
//!
//! When the GPU tier is full its least recently used item is offloaded GPU → host first; when
//! the host tier is full it drops its own least recently used item to make room. The host
//! segment has one slot more than `host_slots` items: a restore swaps the GPU victim into that
//! spare slot before the restored item leaves its own, so a swap never drops anything.
//!
//! An executor may refuse a `ReadKv` or a `Transfer` as [`Refusal::Mismatch`]: the bytes are not
//! what they should be, and the copy must not be used. The cache then acts as if the refused
//! copy never happened: the item is lost (forgotten in both tiers, counted) and, when it is the
//! item being accessed, written anew.
//!
//! Every access is O(1): a hash map with a fixed hasher finds an item (it is never iterated
//! where order could matter), and each tier keeps its slots in an index-linked LRU list over a slab, with a stack
//! of free slots. Nothing depends on hash order, so a stream of accesses always yields the same
//! decisions.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::decision::{Decision, Loc, Refusal, SegmentId};
use crate::executor::Executor;
use crate::place::{DeviceId, Owner, Place, Tier};

/// Most slots a tier may have (bounds the slab's memory).
pub const MAX_SLOTS: u32 = 1 << 24;

/// The shape of a [`TierCache`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TierConfig {
    /// Bytes of one item (> 0).
    pub item_bytes: u64,
    /// Items the GPU tier holds (≥ 1).
    pub gpu_slots: u32,
    /// Items the host tier holds (≥ 1).
    pub host_slots: u32,
    /// `pinned-host` or `pageable-host`.
    pub host_tier: Tier,
    /// The device whose memory (and host memory beside it) the cache uses.
    pub device: DeviceId,
}

impl TierConfig {
    /// Checks the shape: slots within [1, MAX_SLOTS], a host tier, segment sizes that fit u64.
    pub fn validate(&self) -> Result<(), String> {
        if self.item_bytes == 0 {
            return Err("item size must be at least 1 byte".into());
        }
        for (name, slots) in [("GPU", self.gpu_slots), ("host", self.host_slots)] {
            if slots == 0 || slots > MAX_SLOTS {
                return Err(format!(
                    "{name} tier of {slots} slots: must hold 1 to {MAX_SLOTS} items"
                ));
            }
        }
        if !self.host_tier.is_host() {
            return Err(format!(
                "host tier {}: must be pinned-host or pageable-host",
                self.host_tier.name()
            ));
        }
        let host_segment = (self.host_slots as u64 + 1).checked_mul(self.item_bytes);
        let gpu_segment = (self.gpu_slots as u64).checked_mul(self.item_bytes);
        if host_segment.is_none() || gpu_segment.is_none() {
            return Err(format!(
                "items of {} bytes: a tier's segment would exceed 2^64 bytes",
                self.item_bytes
            ));
        }
        Ok(())
    }

    pub fn gpu_place(&self) -> Place {
        Place {
            device: self.device,
            tier: Tier::Gpu,
        }
    }

    pub fn host_place(&self) -> Place {
        Place {
            device: self.device,
            tier: self.host_tier,
        }
    }

    pub fn gpu_segment(&self) -> SegmentId {
        SegmentId::new(self.gpu_place(), Owner::TierCache, 0)
    }

    pub fn host_segment(&self) -> SegmentId {
        SegmentId::new(self.host_place(), Owner::TierCache, 0)
    }

    /// Bytes of the GPU segment: one item per slot.
    pub fn gpu_segment_bytes(&self) -> u64 {
        self.gpu_slots as u64 * self.item_bytes
    }

    /// Bytes of the host segment: one item per slot, and the spare slot restores swap through.
    pub fn host_segment_bytes(&self) -> u64 {
        (self.host_slots as u64 + 1) * self.item_bytes
    }

    /// The capacity each place needs for the cache's two segments (for an executor's books).
    pub fn capacities(&self) -> [(Place, u64); 2] {
        [
            (self.gpu_place(), self.gpu_segment_bytes()),
            (self.host_place(), self.host_segment_bytes()),
        ]
    }
}

/// Why a cache could not be set up.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TierError {
    /// The configuration is not valid (see [`TierConfig::validate`]).
    Config(String),
    /// The executor refused a tier's segment.
    Refused {
        segment: SegmentId,
        bytes: u64,
        refusal: Refusal,
    },
}

impl fmt::Display for TierError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TierError::Config(m) => write!(f, "tier cache: {m}"),
            TierError::Refused {
                segment,
                bytes,
                refusal,
            } => write!(
                f,
                "tier cache: the executor refused {bytes} bytes for {segment:?} ({refusal:?})"
            ),
        }
    }
}

impl std::error::Error for TierError {}

/// What one access did.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Access {
    /// The item was on the GPU and read back intact.
    Hit,
    /// The item was on the host and came back by a transfer.
    Restored,
    /// The item was nowhere and was written.
    Written,
    /// The item's copy (on the GPU, or in a restore) was refused; it was written anew.
    Rewritten,
}

/// Counters of a cache's life. `hits + restores + writes + rewrites = accesses`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TierStats {
    pub accesses: u64,
    pub hits: u64,
    pub restores: u64,
    pub writes: u64,
    pub rewrites: u64,
    /// GPU → host transfers carried out.
    pub offloads: u64,
    /// Items the full host tier dropped to make room.
    pub drops: u64,
    /// Items whose copy an executor refused: forgotten everywhere.
    pub lost: u64,
    pub transfers_refused: u64,
    pub reads_refused: u64,
    pub bytes_offloaded: u64,
    pub bytes_restored: u64,
    /// Bytes written by `WriteKv` (writes and rewrites).
    pub bytes_written: u64,
}

impl TierStats {
    /// Bytes moved between the tiers, both ways.
    pub fn bytes_moved(&self) -> u64 {
        self.bytes_offloaded + self.bytes_restored
    }
}

type ItemMap<V> = crate::fixed_hash::U64Map<V>;

/// One tier's slots.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Level {
    Gpu,
    Host,
}

const NIL: u32 = u32::MAX;

#[derive(Clone, Copy, Debug)]
struct Slot {
    item: u64,
    prev: u32,
    next: u32,
    linked: bool,
}

/// The slots of one tier: an intrusive LRU list (head = least recently used) of the occupied
/// slots, and a stack of free ones. A slot can also be neither (held by an operation in flight).
#[derive(Clone, Debug)]
struct SlotList {
    slots: Vec<Slot>,
    head: u32,
    tail: u32,
    len: u32,
    free: Vec<u32>,
}

impl SlotList {
    fn new(slots: u32) -> Self {
        let empty = Slot {
            item: 0,
            prev: NIL,
            next: NIL,
            linked: false,
        };
        SlotList {
            slots: vec![empty; slots as usize],
            head: NIL,
            tail: NIL,
            len: 0,
            // Popped from the end: slot 0 first.
            free: (0..slots).rev().collect(),
        }
    }

    fn take_free(&mut self) -> Option<u32> {
        self.free.pop()
    }

    fn give_back(&mut self, slot: u32) {
        debug_assert!(!self.slots[slot as usize].linked);
        self.free.push(slot);
    }

    /// Links `slot`, holding `item`, as the most recently used.
    fn push_mru(&mut self, slot: u32, item: u64) {
        let tail = self.tail;
        let s = &mut self.slots[slot as usize];
        assert!(!s.linked, "slot {slot} linked twice");
        *s = Slot {
            item,
            prev: tail,
            next: NIL,
            linked: true,
        };
        match tail {
            NIL => self.head = slot,
            t => self.slots[t as usize].next = slot,
        }
        self.tail = slot;
        self.len += 1;
    }

    /// Unlinks `slot` (it is then neither listed nor free).
    fn unlink(&mut self, slot: u32) -> u64 {
        let Slot {
            item,
            prev,
            next,
            linked,
        } = self.slots[slot as usize];
        assert!(linked, "slot {slot} is not linked");
        match prev {
            NIL => self.head = next,
            p => self.slots[p as usize].next = next,
        }
        match next {
            NIL => self.tail = prev,
            n => self.slots[n as usize].prev = prev,
        }
        let s = &mut self.slots[slot as usize];
        s.linked = false;
        s.prev = NIL;
        s.next = NIL;
        self.len -= 1;
        item
    }

    fn touch(&mut self, slot: u32) {
        if self.tail != slot {
            let item = self.unlink(slot);
            self.push_mru(slot, item);
        }
    }

    /// Unlinks the least recently used slot: (slot, item).
    fn pop_lru(&mut self) -> Option<(u32, u64)> {
        let slot = self.head;
        (slot != NIL).then(|| (slot, self.unlink(slot)))
    }

    /// Items from least to most recently used.
    fn items(&self) -> Vec<u64> {
        let mut out = Vec::with_capacity(self.len as usize);
        let mut at = self.head;
        while at != NIL {
            out.push(self.slots[at as usize].item);
            at = self.slots[at as usize].next;
        }
        out
    }

    /// The full walk: links agree both ways, counts match, free slots are unlinked and unique.
    fn check(&self, name: &str) -> Result<(), String> {
        let mut seen = 0u32;
        let mut prev = NIL;
        let mut at = self.head;
        while at != NIL {
            let s = self
                .slots
                .get(at as usize)
                .ok_or(format!("{name}: link to slot {at} past the end"))?;
            if !s.linked || s.prev != prev {
                return Err(format!("{name}: slot {at} badly linked: {s:?}"));
            }
            seen += 1;
            if seen > self.len {
                return Err(format!("{name}: the list is longer than {}", self.len));
            }
            prev = at;
            at = s.next;
        }
        if prev != self.tail || seen != self.len {
            return Err(format!(
                "{name}: walked {seen} slots to {prev}, expected {} to {}",
                self.len, self.tail
            ));
        }
        let linked = self.slots.iter().filter(|s| s.linked).count() as u32;
        if linked != self.len {
            return Err(format!(
                "{name}: {linked} slots linked, list of {}",
                self.len
            ));
        }
        let mut free = self.free.clone();
        free.sort_unstable();
        free.dedup();
        if free.len() != self.free.len() {
            return Err(format!("{name}: a slot is free twice"));
        }
        if let Some(&s) = free.iter().find(|&&s| self.slots[s as usize].linked) {
            return Err(format!("{name}: slot {s} both free and in use"));
        }
        if self.len as usize + free.len() != self.slots.len() {
            return Err(format!(
                "{name}: {} used + {} free != {} slots",
                self.len,
                free.len(),
                self.slots.len()
            ));
        }
        Ok(())
    }
}

/// The two-tier cache; see the module documentation.
#[derive(Clone, Debug)]
pub struct TierCache {
    config: TierConfig,
    gpu: SlotList,
    host: SlotList,
    /// Where each resident item is. Looked up only, never iterated for a decision.
    resident: ItemMap<(Level, u32)>,
    stats: TierStats,
}

impl TierCache {
    /// Validates `config` and reserves both tiers' segments on `exec` (the GPU segment first).
    /// A refused reservation releases what was reserved and is returned as an error.
    pub fn new<E: Executor + ?Sized>(config: TierConfig, exec: &mut E) -> Result<Self, TierError> {
        config.validate().map_err(TierError::Config)?;
        let gpu = (config.gpu_segment(), config.gpu_segment_bytes());
        let host = (config.host_segment(), config.host_segment_bytes());
        reserve(exec, gpu)?;
        if let Err(e) = reserve(exec, host) {
            apply(exec, Decision::Release { segment: gpu.0 });
            return Err(e);
        }
        Ok(TierCache {
            config,
            gpu: SlotList::new(config.gpu_slots),
            // The spare slot a restore swaps through.
            host: SlotList::new(config.host_slots + 1),
            resident: ItemMap::default(),
            stats: TierStats::default(),
        })
    }

    pub fn config(&self) -> &TierConfig {
        &self.config
    }

    pub fn stats(&self) -> &TierStats {
        &self.stats
    }

    /// The tier `item` is in, if any.
    pub fn tier_of(&self, item: u64) -> Option<Tier> {
        self.resident.get(&item).map(|&(level, _)| match level {
            Level::Gpu => Tier::Gpu,
            Level::Host => self.config.host_tier,
        })
    }

    /// Items on the GPU, least recently used first.
    pub fn gpu_items(&self) -> Vec<u64> {
        self.gpu.items()
    }

    /// Items on the host, least recently used first.
    pub fn host_items(&self) -> Vec<u64> {
        self.host.items()
    }

    /// Makes `item` GPU-resident; see the module documentation.
    pub fn access<E: Executor + ?Sized>(&mut self, item: u64, exec: &mut E) -> Access {
        self.stats.accesses += 1;
        let outcome = match self.resident.get(&item).copied() {
            Some((Level::Gpu, slot)) => self.hit(item, slot, exec),
            Some((Level::Host, slot)) => self.restore(item, slot, exec),
            None => {
                let slot = self.gpu_slot(exec);
                self.write(item, slot, exec);
                self.stats.writes += 1;
                Access::Written
            }
        };
        self.check_counts();
        outcome
    }

    /// Releases both segments.
    pub fn release<E: Executor + ?Sized>(self, exec: &mut E) {
        for segment in [self.config.gpu_segment(), self.config.host_segment()] {
            apply(exec, Decision::Release { segment });
        }
    }

    /// The full walk, for tests: both lists are well formed, every listed item is found at
    /// its slot, nothing else is resident, and each tier holds at most its items.
    pub fn check_invariants(&self) -> Result<(), String> {
        self.gpu.check("GPU tier")?;
        self.host.check("host tier")?;
        if self.host.free.is_empty() {
            return Err("host tier: no spare slot left between accesses".into());
        }
        for (level, list) in [(Level::Gpu, &self.gpu), (Level::Host, &self.host)] {
            for (slot, s) in list.slots.iter().enumerate() {
                if s.linked && self.resident.get(&s.item) != Some(&(level, slot as u32)) {
                    return Err(format!(
                        "item {} in {level:?} slot {slot} is not found there",
                        s.item
                    ));
                }
            }
        }
        let listed = self.gpu.len as usize + self.host.len as usize;
        if self.resident.len() != listed {
            return Err(format!(
                "{} items resident, {listed} in the tiers",
                self.resident.len()
            ));
        }
        let s = &self.stats;
        if s.hits + s.restores + s.writes + s.rewrites != s.accesses {
            return Err(format!("outcomes do not add up to the accesses: {s:?}"));
        }
        Ok(())
    }

    /// The O(1) checks made after every access.
    fn check_counts(&self) {
        assert!(
            self.gpu.len <= self.config.gpu_slots
                && self.host.len <= self.config.host_slots
                && self.resident.len() == self.gpu.len as usize + self.host.len as usize,
            "tier cache counts broken: {} on GPU, {} on host, {} resident",
            self.gpu.len,
            self.host.len,
            self.resident.len()
        );
    }

    fn gpu_loc(&self, slot: u32) -> Loc {
        Loc {
            segment: self.config.gpu_segment(),
            offset: slot as u64 * self.config.item_bytes,
        }
    }

    fn host_loc(&self, slot: u32) -> Loc {
        Loc {
            segment: self.config.host_segment(),
            offset: slot as u64 * self.config.item_bytes,
        }
    }

    /// A hit counts only if the bytes read back are the item's; otherwise it is rewritten.
    fn hit<E: Executor + ?Sized>(&mut self, item: u64, slot: u32, exec: &mut E) -> Access {
        self.gpu.touch(slot);
        let read = Decision::ReadKv {
            at: self.gpu_loc(slot),
            bytes: self.config.item_bytes,
            content: item,
        };
        if exec.apply(read).is_ok() {
            self.stats.hits += 1;
            return Access::Hit;
        }
        self.stats.reads_refused += 1;
        self.stats.lost += 1;
        // Still linked at its slot: the write replaces the bytes in place.
        self.fill(item, slot, exec);
        self.stats.rewrites += 1;
        Access::Rewritten
    }

    /// Brings `item` back from host slot `from`.
    fn restore<E: Executor + ?Sized>(&mut self, item: u64, from: u32, exec: &mut E) -> Access {
        // Held out of the host list while the GPU victim moves into the spare slot, so that
        // making room can never drop the item being restored.
        self.host.unlink(from);
        self.resident.remove(&item);
        let to = self.gpu_slot(exec);
        let transfer = Decision::Transfer {
            from: self.host_loc(from),
            to: self.gpu_loc(to),
            bytes: self.config.item_bytes,
            content: item,
        };
        let outcome = exec.apply(transfer);
        self.host.give_back(from);
        if outcome.is_err() {
            self.stats.transfers_refused += 1;
            self.stats.lost += 1;
            self.write(item, to, exec);
            self.stats.rewrites += 1;
            return Access::Rewritten;
        }
        self.stats.restores += 1;
        self.stats.bytes_restored += self.config.item_bytes;
        self.gpu.push_mru(to, item);
        self.resident.insert(item, (Level::Gpu, to));
        Access::Restored
    }

    /// A free GPU slot, offloading the least recently used item when there is none. The slot
    /// returned is neither listed nor free.
    fn gpu_slot<E: Executor + ?Sized>(&mut self, exec: &mut E) -> u32 {
        if let Some(slot) = self.gpu.take_free() {
            return slot;
        }
        let (slot, victim) = self.gpu.pop_lru().expect("a full GPU tier has items");
        self.resident.remove(&victim);
        self.offload(victim, slot, exec);
        slot
    }

    /// Copies `victim` from GPU slot `from` to the host, dropping the host's least recently
    /// used item when the host tier is full.
    fn offload<E: Executor + ?Sized>(&mut self, victim: u64, from: u32, exec: &mut E) {
        let to = if self.host.len < self.config.host_slots {
            self.host
                .take_free()
                .expect("the host segment has a spare slot")
        } else {
            let (slot, dropped) = self.host.pop_lru().expect("a full host tier has items");
            self.resident.remove(&dropped);
            self.stats.drops += 1;
            slot
        };
        let transfer = Decision::Transfer {
            from: self.gpu_loc(from),
            to: self.host_loc(to),
            bytes: self.config.item_bytes,
            content: victim,
        };
        if exec.apply(transfer).is_err() {
            self.stats.transfers_refused += 1;
            self.stats.lost += 1;
            self.host.give_back(to);
            return;
        }
        self.stats.offloads += 1;
        self.stats.bytes_offloaded += self.config.item_bytes;
        self.host.push_mru(to, victim);
        self.resident.insert(victim, (Level::Host, to));
    }

    /// Writes `item` into the free GPU slot `slot` and lists it.
    fn write<E: Executor + ?Sized>(&mut self, item: u64, slot: u32, exec: &mut E) {
        self.fill(item, slot, exec);
        self.gpu.push_mru(slot, item);
        self.resident.insert(item, (Level::Gpu, slot));
    }

    fn fill<E: Executor + ?Sized>(&mut self, item: u64, slot: u32, exec: &mut E) {
        let write = Decision::WriteKv {
            at: self.gpu_loc(slot),
            bytes: self.config.item_bytes,
            content: item,
        };
        apply(exec, write);
        self.stats.bytes_written += self.config.item_bytes;
    }
}

fn reserve<E: Executor + ?Sized>(
    exec: &mut E,
    (segment, bytes): (SegmentId, u64),
) -> Result<(), TierError> {
    exec.apply(Decision::Reserve { segment, bytes })
        .map_err(|refusal| TierError::Refused {
            segment,
            bytes,
            refusal,
        })
}

/// A decision the contract never lets an executor refuse.
fn apply<E: Executor + ?Sized>(exec: &mut E, d: Decision) {
    if let Err(r) = exec.apply(d) {
        panic!("executor refused {d:?} ({r:?}), which may not be refused");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::books::Books;
    use crate::executor::Ledger;

    fn config(gpu_slots: u32, host_slots: u32) -> TierConfig {
        TierConfig {
            item_bytes: 64,
            gpu_slots,
            host_slots,
            host_tier: Tier::PinnedHost,
            device: DeviceId(0),
        }
    }

    fn ledger(c: &TierConfig) -> Ledger {
        Ledger::new(Books::with_places(&c.capacities()))
    }

    #[test]
    fn content_goes_gpu_to_host_and_back() {
        let c = config(2, 2);
        let mut l = ledger(&c);
        let mut t = TierCache::new(c, &mut l).unwrap();
        assert_eq!(t.access(1, &mut l), Access::Written);
        assert_eq!(t.access(2, &mut l), Access::Written);
        assert_eq!(t.access(1, &mut l), Access::Hit);
        // 2 is the LRU now: it goes to the host.
        assert_eq!(t.access(3, &mut l), Access::Written);
        assert_eq!(t.tier_of(2), Some(Tier::PinnedHost));
        assert_eq!(t.gpu_items(), [1, 3]);
        // Restoring 2 offloads 1 through the spare slot; nothing is dropped.
        assert_eq!(t.access(2, &mut l), Access::Restored);
        assert_eq!(t.gpu_items(), [3, 2]);
        assert_eq!(t.host_items(), [1]);
        let s = *t.stats();
        assert_eq!((s.offloads, s.restores, s.drops, s.hits), (2, 1, 0, 1));
        assert_eq!(s.bytes_moved(), 3 * 64);
        t.check_invariants().unwrap();
        t.release(&mut l);
        assert_eq!(l.books.segment_count(), 0);
    }

    #[test]
    fn a_full_host_tier_drops_its_least_recently_used_item() {
        let c = config(1, 2);
        let mut l = ledger(&c);
        let mut t = TierCache::new(c, &mut l).unwrap();
        for item in 1..=4 {
            t.access(item, &mut l);
        }
        assert_eq!(t.gpu_items(), [4]);
        assert_eq!(t.host_items(), [2, 3]);
        assert_eq!(t.tier_of(1), None);
        assert_eq!(t.stats().drops, 1);
        // The host tier is full (2 items): restoring 2 still drops nothing.
        assert_eq!(t.access(2, &mut l), Access::Restored);
        assert_eq!(t.host_items(), [3, 4]);
        assert_eq!(t.stats().drops, 1);
        assert_eq!(t.access(1, &mut l), Access::Written);
        t.check_invariants().unwrap();
    }

    #[test]
    fn a_refused_segment_is_an_error_and_leaves_nothing_reserved() {
        let c = config(4, 4);
        let short = [
            (c.gpu_place(), c.gpu_segment_bytes()),
            (c.host_place(), c.host_segment_bytes() - 1),
        ];
        let mut l = Ledger::new(Books::with_places(&short));
        let e = TierCache::new(c, &mut l).unwrap_err();
        assert!(matches!(
            e,
            TierError::Refused {
                refusal: Refusal::Capacity,
                ..
            }
        ));
        assert!(e.to_string().contains("refused"), "{e}");
        assert_eq!(l.books.segment_count(), 0);
    }

    #[test]
    fn bad_configs_are_refused_with_a_reason() {
        let mut c = config(1, 1);
        c.item_bytes = 0;
        assert!(c.validate().unwrap_err().contains("1 byte"));
        let mut c = config(0, 1);
        assert!(c.validate().unwrap_err().contains("GPU tier"));
        c = config(1, MAX_SLOTS + 1);
        assert!(c.validate().unwrap_err().contains("host tier"));
        c = config(1, 1);
        c.host_tier = Tier::Gpu;
        assert!(c.validate().unwrap_err().contains("pinned-host"));
        c = config(1, 1);
        c.item_bytes = u64::MAX / 2 + 1;
        assert!(c.validate().unwrap_err().contains("2^64"));
        let mut l = ledger(&config(1, 1));
        assert!(matches!(
            TierCache::new(c, &mut l),
            Err(TierError::Config(_))
        ));
    }

    /// Refuses the transfers and reads whose (1-based) index is listed, as a device that found
    /// wrong bytes would.
    struct Refusing {
        ledger: Ledger,
        refuse: Vec<u64>,
        seen: u64,
    }

    impl Executor for Refusing {
        fn apply(&mut self, d: Decision) -> Result<(), Refusal> {
            if matches!(d, Decision::Transfer { .. } | Decision::ReadKv { .. }) {
                self.seen += 1;
                if self.refuse.contains(&self.seen) {
                    self.ledger.record(d, Err(Refusal::Mismatch));
                    return Err(Refusal::Mismatch);
                }
            }
            self.ledger.apply(d)
        }
        fn books(&self) -> &Books {
            &self.ledger.books
        }
        fn digest(&self) -> &crate::digest::Digest {
            &self.ledger.digest
        }
    }

    #[test]
    fn a_refused_copy_is_never_used_and_the_item_is_rewritten() {
        let c = config(1, 2);
        // The transfers and reads are counted from 1 across the whole run.
        let mut ex = Refusing {
            ledger: ledger(&c),
            refuse: vec![1],
            seen: 0,
        };
        let mut t = TierCache::new(c, &mut ex).unwrap();
        t.access(1, &mut ex);
        // Offloading 1 (check #1) is refused: 1 is lost, not on the host.
        assert_eq!(t.access(2, &mut ex), Access::Written);
        assert_eq!(t.tier_of(1), None);
        assert_eq!(t.host_items(), Vec::<u64>::new());
        assert_eq!(t.access(1, &mut ex), Access::Written);
        let s = *t.stats();
        assert_eq!((s.lost, s.transfers_refused, s.offloads), (1, 1, 1));
        // Now: 1 on GPU, 2 on host. Restore 2: offload of 1 is #3, the restore #4.
        ex.refuse = vec![4];
        assert_eq!(t.access(2, &mut ex), Access::Rewritten);
        assert_eq!(t.gpu_items(), [2]);
        assert_eq!(t.host_items(), [1]);
        // A hit whose read is refused (#5) is rewritten in place.
        ex.refuse = vec![5];
        assert_eq!(t.access(2, &mut ex), Access::Rewritten);
        let s = *t.stats();
        assert_eq!((s.lost, s.reads_refused, s.rewrites, s.hits), (3, 1, 2, 0));
        t.check_invariants().unwrap();
    }
}
