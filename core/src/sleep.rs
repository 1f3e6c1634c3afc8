//! vLLM 0.33's sleep mode: `CuMemAllocator` (`vllm/device_allocator/cumem.py`) as a state
//! machine over the decision contract.
//!
//! Every allocation reserves its own virtual range once (`ReserveVa`) and maps it whole
//! (`Map`); it carries a [`Tag`] chosen when it is made. [`CuMemPool::sleep`] backs up the
//! allocations whose tag the level offloads (a pinned host segment and a GPU → host
//! `Transfer`), then unmaps every awake allocation: the others are *discarded*.
//! [`CuMemPool::wake_up`] maps the same range again — the segment, hence the address, never
//! changes — and copies a backup back (host → GPU), releasing it; an allocation without a backup
//! wakes uninitialised, and its content is unknown until the caller writes it again (weights
//! reloaded from storage after a level-2 sleep; KV never survives a sleep).
//!
//! Levels, as vLLM's worker sets them: level 1 offloads `weights`, `runtime` and `cudagraph`
//! (the KV cache is discarded); level 2 offloads `runtime` and `cudagraph` (weights are
//! discarded too). `wake_up(None)` wakes everything; `wake_up(Some(tags))` wakes the allocations
//! whose tag is listed or is not deferrable (only `weights` and `kv_cache` can wait).
//!
//! A refused decision did not happen: a refused backup leaves the allocation awake and the
//! sleep stops there (vLLM would raise); a refused map leaves it asleep with its backup kept.

use serde::{Deserialize, Serialize};

use crate::decision::{Decision, Loc, Refusal, SegmentId};
use crate::executor::Executor;
use crate::place::{DeviceId, Owner, Place, Tier};

/// vLLM's granularity for one allocation (`cuMemGetAllocationGranularity`, 2 MiB on NVIDIA).
pub const GRANULARITY_BYTES: u64 = 2 << 20;

/// Most allocations one pool tracks (each is a segment of its own).
pub const MAX_ALLOCATIONS: usize = 1 << 20;

/// What an allocation holds, named as vLLM's worker names its memory pools.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Tag {
    Weights,
    KvCache,
    Runtime,
    Cudagraph,
}

impl Tag {
    pub const ALL: [Tag; 4] = [Tag::Weights, Tag::KvCache, Tag::Runtime, Tag::Cudagraph];

    pub fn name(self) -> &'static str {
        match self {
            Tag::Weights => "weights",
            Tag::KvCache => "kv_cache",
            Tag::Runtime => "runtime",
            Tag::Cudagraph => "cudagraph",
        }
    }

    /// vLLM's `DEFERRABLE_TAGS`: only these may stay asleep when others wake.
    pub fn deferrable(self) -> bool {
        matches!(self, Tag::Weights | Tag::KvCache)
    }

    fn owner(self) -> Owner {
        match self {
            Tag::Weights => Owner::Weights,
            Tag::KvCache => Owner::KvPool,
            Tag::Runtime => Owner::Runtime,
            Tag::Cudagraph => Owner::GraphBuffers,
        }
    }
}

/// vLLM's sleep levels (level 0 only pauses scheduling and touches no memory).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum SleepLevel {
    /// Weights, runtime and CUDA-graph memory backed up to pinned host memory; KV discarded.
    One,
    /// Only runtime and CUDA-graph memory backed up; weights discarded (reloaded on wake).
    Two,
}

impl SleepLevel {
    pub fn from_number(level: u64) -> Result<SleepLevel, String> {
        match level {
            1 => Ok(SleepLevel::One),
            2 => Ok(SleepLevel::Two),
            other => Err(format!("sleep level {other}: must be 1 or 2")),
        }
    }

    /// The tags whose content survives the sleep in a host backup.
    pub fn offloads(self, tag: Tag) -> bool {
        match self {
            SleepLevel::One => matches!(tag, Tag::Weights | Tag::Runtime | Tag::Cudagraph),
            SleepLevel::Two => matches!(tag, Tag::Runtime | Tag::Cudagraph),
        }
    }
}

/// One allocation of the pool, found again by its handle.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Handle(pub u32);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Allocation {
    tag: Tag,
    bytes: u64,
    /// The virtual range on the GPU: the same for the allocation's whole life.
    segment: SegmentId,
    /// What its bytes hold while awake (`None`: uninitialised or discarded).
    content: Option<u64>,
    asleep: bool,
    /// The pinned host copy made at sleep, until the wake that restores it.
    backup: Option<SegmentId>,
}

/// Bytes moved and dropped by one `sleep` or `wake_up`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SleepStats {
    /// GPU → host backups (sleep) or host → GPU restores (wake).
    pub bytes_copied: u64,
    /// Mapped bytes given back (sleep) or mapped again (wake).
    pub bytes_unmapped: u64,
    pub bytes_mapped: u64,
    /// Allocations whose content was discarded (sleep) or that woke uninitialised (wake).
    pub allocations_discarded: u32,
    pub allocations_uninitialised: u32,
}

/// Why a sleep or wake stopped part way.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SleepError {
    /// The executor refused a decision (a host backup, a map, a copy).
    Refused {
        handle: Handle,
        decision: &'static str,
        refusal: Refusal,
    },
}

impl std::fmt::Display for SleepError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SleepError::Refused {
                handle,
                decision,
                refusal,
            } => write!(
                f,
                "allocation {}: {decision} refused ({refusal:?})",
                handle.0
            ),
        }
    }
}

/// The allocations of one device under sleep mode.
#[derive(Clone, Debug)]
pub struct CuMemPool {
    device: DeviceId,
    allocations: Vec<Option<Allocation>>,
    /// Next segment index per owner (GPU ranges) and for host backups.
    next_index: u32,
    next_backup_index: u32,
}

impl CuMemPool {
    pub fn new(device: DeviceId) -> CuMemPool {
        Self::numbered_from(device, 0)
    }

    /// A pool whose segments are numbered from `first_index`: several pools (one per engine,
    /// as each vLLM process has its own allocator) share a device without id collisions.
    pub fn numbered_from(device: DeviceId, first_index: u32) -> CuMemPool {
        CuMemPool {
            device,
            allocations: Vec::new(),
            next_index: first_index,
            next_backup_index: first_index,
        }
    }

    pub fn device(&self) -> DeviceId {
        self.device
    }

    /// `bytes` rounded up to the allocation granularity (`None` past 2^64).
    pub fn aligned(bytes: u64) -> Option<u64> {
        bytes.max(1).checked_next_multiple_of(GRANULARITY_BYTES)
    }

    /// Reserves and maps a range of `bytes` (rounded up to the granularity) tagged `tag`, and
    /// writes `content` into it (weights loaded, buffers initialised).
    pub fn allocate(
        &mut self,
        tag: Tag,
        bytes: u64,
        content: u64,
        exec: &mut dyn Executor,
    ) -> Result<Handle, Refusal> {
        assert!(
            self.allocations.len() < MAX_ALLOCATIONS,
            "more than {MAX_ALLOCATIONS} allocations"
        );
        let bytes = Self::aligned(bytes).ok_or(Refusal::Capacity)?;
        let segment = SegmentId::new(Place::gpu(self.device.0), tag.owner(), self.next_index);
        exec.apply(Decision::ReserveVa { segment, bytes })?;
        self.next_index += 1;
        let map = Decision::Map {
            segment,
            offset: 0,
            bytes,
        };
        if let Err(r) = exec.apply(map) {
            exec.apply(Decision::ReleaseVa { segment })
                .expect("releasing a range is never refused");
            return Err(r);
        }
        let at = Loc { segment, offset: 0 };
        exec.apply(Decision::WriteKv { at, bytes, content })
            .expect("a write is never refused");
        let handle = Handle(self.allocations.len() as u32);
        self.allocations.push(Some(Allocation {
            tag,
            bytes,
            segment,
            content: Some(content),
            asleep: false,
            backup: None,
        }));
        Ok(handle)
    }

    /// Unmaps (when awake) and frees the range, and drops any backup.
    pub fn free(&mut self, handle: Handle, exec: &mut dyn Executor) {
        let a = self.allocations[handle.0 as usize]
            .take()
            .expect("free of a live allocation");
        if !a.asleep {
            exec.apply(Decision::Unmap {
                segment: a.segment,
                offset: 0,
                bytes: a.bytes,
            })
            .expect("an unmap is never refused");
        }
        exec.apply(Decision::ReleaseVa { segment: a.segment })
            .expect("releasing a range is never refused");
        if let Some(backup) = a.backup {
            exec.apply(Decision::Release { segment: backup })
                .expect("a release is never refused");
        }
    }

    /// Writes `content` into an awake allocation (weights reloaded from storage).
    pub fn write(&mut self, handle: Handle, content: u64, exec: &mut dyn Executor) {
        let a = self.live_mut(handle);
        assert!(!a.asleep, "write to a sleeping allocation");
        let (at, bytes) = (Loc::at(a.segment), a.bytes);
        a.content = Some(content);
        exec.apply(Decision::WriteKv { at, bytes, content })
            .expect("a write is never refused");
    }

    /// vLLM's `sleep(offload_tags)` at `level`: back up what the level offloads, then unmap
    /// every awake allocation.
    pub fn sleep(
        &mut self,
        level: SleepLevel,
        exec: &mut dyn Executor,
    ) -> Result<SleepStats, SleepError> {
        let mut stats = SleepStats::default();
        for i in 0..self.allocations.len() {
            let Some(a) = self.allocations[i] else {
                continue;
            };
            if a.asleep {
                continue;
            }
            let handle = Handle(i as u32);
            let keep = level.offloads(a.tag) && a.content.is_some();
            if keep {
                let backup = self.back_up(handle, a, exec)?;
                stats.bytes_copied += a.bytes;
                self.live_mut(handle).backup = Some(backup);
            } else {
                stats.allocations_discarded += 1;
            }
            exec.apply(Decision::Unmap {
                segment: a.segment,
                offset: 0,
                bytes: a.bytes,
            })
            .expect("an unmap is never refused");
            stats.bytes_unmapped += a.bytes;
            let a = self.live_mut(handle);
            a.asleep = true;
            if !keep {
                a.content = None;
            }
        }
        Ok(stats)
    }

    /// A pinned host segment holding a copy of `a`.
    fn back_up(
        &mut self,
        handle: Handle,
        a: Allocation,
        exec: &mut dyn Executor,
    ) -> Result<SegmentId, SleepError> {
        let refused = |decision, refusal| SleepError::Refused {
            handle,
            decision,
            refusal,
        };
        let host = Place::new(self.device.0, Tier::PinnedHost);
        let backup = SegmentId::new(host, a.tag.owner(), self.next_backup_index);
        exec.apply(Decision::Reserve {
            segment: backup,
            bytes: a.bytes,
        })
        .map_err(|r| refused("host backup", r))?;
        self.next_backup_index += 1;
        let copy = Decision::Transfer {
            from: Loc::at(a.segment),
            to: Loc::at(backup),
            bytes: a.bytes,
            content: a.content.expect("only initialised content is backed up"),
        };
        if let Err(r) = exec.apply(copy) {
            exec.apply(Decision::Release { segment: backup })
                .expect("a release is never refused");
            return Err(refused("backup copy", r));
        }
        Ok(backup)
    }

    /// vLLM's `wake_up(tags)`: maps the sleeping allocations `tags` selects at their own
    /// addresses and restores their backups.
    pub fn wake_up(
        &mut self,
        tags: Option<&[Tag]>,
        exec: &mut dyn Executor,
    ) -> Result<SleepStats, SleepError> {
        let mut stats = SleepStats::default();
        for i in 0..self.allocations.len() {
            let Some(a) = self.allocations[i] else {
                continue;
            };
            let selected = match tags {
                None => true,
                Some(tags) => tags.contains(&a.tag) || !a.tag.deferrable(),
            };
            if !a.asleep || !selected {
                continue;
            }
            let handle = Handle(i as u32);
            let refused = |decision, refusal| SleepError::Refused {
                handle,
                decision,
                refusal,
            };
            exec.apply(Decision::Map {
                segment: a.segment,
                offset: 0,
                bytes: a.bytes,
            })
            .map_err(|r| refused("map", r))?;
            stats.bytes_mapped += a.bytes;
            let restored = match a.backup {
                Some(backup) => {
                    let copy = Decision::Transfer {
                        from: Loc::at(backup),
                        to: Loc::at(a.segment),
                        bytes: a.bytes,
                        content: a.content.expect("a backup holds the content"),
                    };
                    let outcome = exec.apply(copy);
                    if outcome.is_ok() {
                        exec.apply(Decision::Release { segment: backup })
                            .expect("a release is never refused");
                        stats.bytes_copied += a.bytes;
                    }
                    outcome.map_err(|r| refused("restore copy", r))
                }
                None => {
                    stats.allocations_uninitialised += 1;
                    Ok(())
                }
            };
            let live = self.live_mut(handle);
            live.asleep = false;
            match restored {
                Ok(()) => live.backup = None,
                Err(e) => {
                    // The copy cannot be used: the allocation is awake but holds nothing known.
                    live.content = None;
                    live.backup = None;
                    exec.apply(Decision::Release {
                        segment: a.backup.expect("had a backup"),
                    })
                    .expect("a release is never refused");
                    return Err(e);
                }
            }
        }
        Ok(stats)
    }

    /// vLLM's `discard(tags)`: unmaps the awake allocations with these tags, with no backup.
    pub fn discard(&mut self, tags: &[Tag], exec: &mut dyn Executor) -> u64 {
        let mut bytes = 0;
        for slot in self.allocations.iter_mut() {
            let Some(a) = slot.as_mut() else { continue };
            if a.asleep || !tags.contains(&a.tag) {
                continue;
            }
            exec.apply(Decision::Unmap {
                segment: a.segment,
                offset: 0,
                bytes: a.bytes,
            })
            .expect("an unmap is never refused");
            a.asleep = true;
            a.content = None;
            bytes += a.bytes;
        }
        bytes
    }

    /// vLLM's `get_current_usage`: the bytes of every allocation, asleep or awake.
    pub fn current_usage_bytes(&self) -> u64 {
        self.live().map(|a| a.bytes).sum()
    }

    /// Bytes of GPU memory mapped now.
    pub fn mapped_bytes(&self) -> u64 {
        self.live().filter(|a| !a.asleep).map(|a| a.bytes).sum()
    }

    /// Bytes held in pinned host backups now.
    pub fn backup_bytes(&self) -> u64 {
        self.live()
            .filter(|a| a.backup.is_some())
            .map(|a| a.bytes)
            .sum()
    }

    pub fn is_asleep(&self, handle: Handle) -> bool {
        self.live_ref(handle).asleep
    }

    /// What an allocation's bytes hold (`None`: asleep without backup, or uninitialised).
    pub fn content(&self, handle: Handle) -> Option<u64> {
        let a = self.live_ref(handle);
        a.content.filter(|_| !a.asleep || a.backup.is_some())
    }

    /// The allocation's range: the same segment from allocation to free.
    pub fn segment(&self, handle: Handle) -> SegmentId {
        self.live_ref(handle).segment
    }

    pub fn tag(&self, handle: Handle) -> Tag {
        self.live_ref(handle).tag
    }

    pub fn bytes(&self, handle: Handle) -> u64 {
        self.live_ref(handle).bytes
    }

    /// Every handle still allocated, in allocation order.
    pub fn handles(&self) -> impl Iterator<Item = Handle> + '_ {
        self.allocations
            .iter()
            .enumerate()
            .filter(|(_, a)| a.is_some())
            .map(|(i, _)| Handle(i as u32))
    }

    /// Checks what must hold between sleeps and wakes: a backup only while asleep, content
    /// known while awake unless discarded, every range aligned.
    pub fn check_invariants(&self) {
        for a in self.live() {
            assert_eq!(a.bytes % GRANULARITY_BYTES, 0, "unaligned {a:?}");
            assert!(a.backup.is_none() || a.asleep, "backup while awake: {a:?}");
            assert!(
                a.backup.is_none() || a.content.is_some(),
                "backup of unknown content: {a:?}"
            );
        }
    }

    fn live(&self) -> impl Iterator<Item = &Allocation> {
        self.allocations.iter().flatten()
    }

    fn live_ref(&self, handle: Handle) -> &Allocation {
        self.allocations[handle.0 as usize]
            .as_ref()
            .expect("a live allocation")
    }

    fn live_mut(&mut self, handle: Handle) -> &mut Allocation {
        self.allocations[handle.0 as usize]
            .as_mut()
            .expect("a live allocation")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::books::Books;
    use crate::executor::Ledger;

    struct Exec(Ledger);

    impl Executor for Exec {
        fn apply(&mut self, d: Decision) -> Result<(), Refusal> {
            let outcome = self.0.books.admits(&d);
            self.0.record(d, outcome);
            outcome
        }
        fn books(&self) -> &Books {
            &self.0.books
        }
        fn digest(&self) -> &crate::digest::Digest {
            &self.0.digest
        }
    }

    fn exec(gpu_bytes: u64, host_bytes: u64) -> Exec {
        Exec(Ledger::new(Books::with_places(&[
            (Place::GPU0, gpu_bytes),
            (Place::new(0, Tier::PinnedHost), host_bytes),
        ])))
    }

    const MIB: u64 = 1 << 20;

    #[test]
    fn level_one_backs_up_weights_and_discards_kv_at_the_same_addresses() {
        let mut x = exec(64 * MIB, 64 * MIB);
        let mut pool = CuMemPool::new(DeviceId(0));
        let w = pool.allocate(Tag::Weights, 5 * MIB, 11, &mut x).unwrap();
        let kv = pool.allocate(Tag::KvCache, 8 * MIB, 22, &mut x).unwrap();
        assert_eq!(pool.bytes(w), 6 * MIB, "rounded up to 2 MiB");
        let segment = pool.segment(w);
        assert_eq!(x.books().reserved_bytes(), 14 * MIB);

        let s = pool.sleep(SleepLevel::One, &mut x).unwrap();
        assert_eq!((s.bytes_copied, s.bytes_unmapped), (6 * MIB, 14 * MIB));
        assert_eq!(s.allocations_discarded, 1);
        assert_eq!(x.books().account(Place::GPU0).reserved_bytes, 0);
        assert_eq!(pool.backup_bytes(), 6 * MIB);
        assert_eq!(pool.content(kv), None);
        pool.check_invariants();

        let s = pool.wake_up(None, &mut x).unwrap();
        assert_eq!((s.bytes_copied, s.bytes_mapped), (6 * MIB, 14 * MIB));
        assert_eq!(s.allocations_uninitialised, 1);
        assert_eq!(pool.segment(w), segment, "the address survives the sleep");
        assert_eq!(pool.content(w), Some(11));
        assert_eq!(pool.content(kv), None, "KV never survives a sleep");
        assert_eq!(pool.backup_bytes(), 0);
        assert_eq!(
            x.books()
                .account(Place::new(0, Tier::PinnedHost))
                .reserved_bytes,
            0
        );
        pool.check_invariants();
    }

    #[test]
    fn level_two_discards_weights_and_a_wake_by_tag_defers_only_weights_and_kv() {
        let mut x = exec(64 * MIB, 64 * MIB);
        let mut pool = CuMemPool::new(DeviceId(0));
        let w = pool.allocate(Tag::Weights, 4 * MIB, 1, &mut x).unwrap();
        let kv = pool.allocate(Tag::KvCache, 4 * MIB, 2, &mut x).unwrap();
        let g = pool.allocate(Tag::Cudagraph, 2 * MIB, 3, &mut x).unwrap();
        let s = pool.sleep(SleepLevel::Two, &mut x).unwrap();
        assert_eq!(s.bytes_copied, 2 * MIB, "only the graph memory is kept");
        assert_eq!(s.allocations_discarded, 2);

        pool.wake_up(Some(&[Tag::Weights]), &mut x).unwrap();
        assert!(!pool.is_asleep(w));
        assert!(!pool.is_asleep(g), "not deferrable: wakes with any tags");
        assert!(pool.is_asleep(kv));
        assert_eq!(pool.content(w), None, "weights reload from storage");
        assert_eq!(pool.content(g), Some(3));
        pool.write(w, 1, &mut x);
        assert_eq!(pool.content(w), Some(1));
        pool.wake_up(Some(&[Tag::KvCache]), &mut x).unwrap();
        assert!(!pool.is_asleep(kv));
        pool.check_invariants();
    }

    #[test]
    fn a_refused_backup_leaves_the_allocation_awake_and_mapped() {
        let mut x = exec(64 * MIB, 2 * MIB);
        let mut pool = CuMemPool::new(DeviceId(0));
        let small = pool.allocate(Tag::Runtime, 2 * MIB, 5, &mut x).unwrap();
        let big = pool.allocate(Tag::Weights, 8 * MIB, 6, &mut x).unwrap();
        let err = pool.sleep(SleepLevel::One, &mut x).unwrap_err();
        assert_eq!(
            err,
            SleepError::Refused {
                handle: big,
                decision: "host backup",
                refusal: Refusal::Capacity
            }
        );
        assert!(pool.is_asleep(small));
        assert!(!pool.is_asleep(big));
        assert_eq!(pool.content(big), Some(6));
        assert_eq!(pool.mapped_bytes(), 8 * MIB);
        pool.check_invariants();
    }

    #[test]
    fn a_refused_map_keeps_the_allocation_asleep_with_its_backup() {
        let mut x = exec(8 * MIB, 64 * MIB);
        let mut pool = CuMemPool::new(DeviceId(0));
        let w = pool.allocate(Tag::Weights, 8 * MIB, 9, &mut x).unwrap();
        pool.sleep(SleepLevel::One, &mut x).unwrap();
        // Someone else takes the memory while the pool sleeps.
        let other = SegmentId::new(Place::GPU0, Owner::Scratch, 0);
        x.apply(Decision::Reserve {
            segment: other,
            bytes: 4 * MIB,
        })
        .unwrap();
        let err = pool.wake_up(None, &mut x).unwrap_err();
        assert!(matches!(
            err,
            SleepError::Refused {
                decision: "map",
                ..
            }
        ));
        assert!(pool.is_asleep(w));
        assert_eq!(pool.content(w), Some(9));
        assert_eq!(pool.backup_bytes(), 8 * MIB);
        x.apply(Decision::Release { segment: other }).unwrap();
        pool.wake_up(None, &mut x).unwrap();
        assert_eq!(pool.content(w), Some(9));
    }

    #[test]
    fn free_returns_everything_asleep_or_awake() {
        let mut x = exec(64 * MIB, 64 * MIB);
        let mut pool = CuMemPool::new(DeviceId(0));
        let a = pool.allocate(Tag::Weights, 2 * MIB, 1, &mut x).unwrap();
        let b = pool.allocate(Tag::Runtime, 2 * MIB, 2, &mut x).unwrap();
        pool.sleep(SleepLevel::One, &mut x).unwrap();
        pool.free(a, &mut x);
        pool.wake_up(None, &mut x).unwrap();
        pool.free(b, &mut x);
        assert_eq!(x.books().reserved_bytes(), 0);
        assert_eq!(pool.current_usage_bytes(), 0);
        assert_eq!(pool.handles().count(), 0);
    }

    #[test]
    fn sleep_levels_parse_only_one_and_two() {
        assert_eq!(SleepLevel::from_number(1), Ok(SleepLevel::One));
        assert_eq!(SleepLevel::from_number(2), Ok(SleepLevel::Two));
        assert!(SleepLevel::from_number(0).is_err());
        assert!(SleepLevel::from_number(3).is_err());
    }
}
