//! The memory an executor works on: a small, object-safe trait over real device memory.
//!
//! A device hands out *bases*: opaque `u64` handles (host or device addresses) naming a
//! reserved region. Every other call names a base and a byte range inside it; a device checks
//! each range against what it reserved and mapped (`Regions`, the one place where bounds are
//! checked), and answers an error for anything outside, never touching memory it does not own.
//!
//! A device holds every tier of one accelerator: its own memory and the host memory beside it
//! (pinned and pageable), each region in the tier it was reserved in.

use std::collections::BTreeMap;
use std::fmt;

use gpumem_core::place::{DeviceId, Tier};

/// What kind of failure a [`DeviceError`] is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceErrorKind {
    /// No driver could be loaded (no libcuda on this machine).
    NoDriver,
    /// The device or the OS refused memory.
    OutOfMemory,
    /// The call named memory the device does not hold as asked (unknown base, out of range,
    /// unaligned, not mapped): a bug in whoever called, reported instead of touching memory.
    Invalid,
    /// The device cannot do what was asked although it is well formed (e.g. a `map` that is
    /// not aligned to the device's allocation granularity).
    Unsupported,
    /// Any other error the driver or OS returned.
    Driver,
}

/// A device call that failed, with a message that says what and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceError {
    pub kind: DeviceErrorKind,
    pub message: String,
}

impl DeviceError {
    pub fn new(kind: DeviceErrorKind, message: impl Into<String>) -> Self {
        DeviceError {
            kind,
            message: message.into(),
        }
    }

    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(DeviceErrorKind::Invalid, message)
    }
}

impl fmt::Display for DeviceError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for DeviceError {}

/// Result of checking a byte range against its pattern.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Check {
    /// Bytes that differ from the pattern.
    pub mismatched_bytes: u64,
    /// Offset (from the start of the checked range) of the first differing byte.
    pub first_mismatch: Option<u64>,
}

/// Real memory that decisions are carried out on.
///
/// `reserve`/`release` handle physical segments; `reserve_va`/`map`/`unmap`/`release_va` handle
/// virtual ranges whose pages are backed on demand (`map` offsets and sizes must be multiples of
/// [`Device::granularity_bytes`]). `fill`/`verify` write and check the pattern of
/// [`crate::pattern`] for a block seeded with `seed`, where `offset` is the block's start.
pub trait Device {
    /// Human-readable name, e.g. `host` or `cuda:0 NVIDIA H100 80GB HBM3`.
    fn name(&self) -> String;
    /// Alignment that `map`/`unmap` offsets and sizes must have.
    fn granularity_bytes(&self) -> u64;
    /// Whether this device carries out decisions placed on `device` (host memory stands in
    /// for any number of devices; a GPU is device 0 of its executor).
    fn serves(&self, device: DeviceId) -> bool;
    /// Whether memory of `tier` shows in [`Device::resident_bytes`].
    fn resident_includes(&self, tier: Tier) -> bool;

    /// Obtains `bytes` of physical memory in `tier`; returns its base.
    fn reserve(&mut self, tier: Tier, bytes: u64) -> Result<u64, DeviceError>;
    fn release(&mut self, base: u64) -> Result<(), DeviceError>;
    /// Reserves `bytes` of address space in `tier` only; returns its base.
    fn reserve_va(&mut self, tier: Tier, bytes: u64) -> Result<u64, DeviceError>;
    fn map(&mut self, base: u64, offset: u64, bytes: u64) -> Result<(), DeviceError>;
    fn unmap(&mut self, base: u64, offset: u64, bytes: u64) -> Result<(), DeviceError>;
    /// Frees a virtual range, unmapping whatever is still mapped in it.
    fn release_va(&mut self, base: u64) -> Result<(), DeviceError>;

    /// Writes the pattern of `seed` over `[offset, offset + bytes)` of `base`.
    fn fill(&mut self, base: u64, offset: u64, bytes: u64, seed: u64) -> Result<(), DeviceError>;
    /// Checks `[offset, offset + bytes)` of `base` against the pattern of `seed`.
    fn verify(
        &mut self,
        base: u64,
        offset: u64,
        bytes: u64,
        seed: u64,
    ) -> Result<Check, DeviceError>;
    /// Copies `bytes` from `(base, offset)` to `(base, offset)`, in any tiers; the ranges may
    /// overlap.
    fn copy(&mut self, from: (u64, u64), to: (u64, u64), bytes: u64) -> Result<(), DeviceError>;
    /// Flips one byte (fault injection).
    fn corrupt(&mut self, base: u64, offset: u64) -> Result<(), DeviceError>;

    /// Memory in use as the device itself reports it (driver used memory, or the process's
    /// resident memory for host memory); `None` when it cannot be read.
    fn resident_bytes(&mut self) -> Option<u64>;

    /// Memory in use as measured now, whatever scale decisions are carried out at: what
    /// [`Device::resident_bytes`] reads, except that a [`crate::Scaled`] device (whose
    /// resident bytes cannot be compared with the books) passes its inner device's through.
    /// For measuring what a sleep gives back, never for comparing with the books.
    fn resident_bytes_measured(&mut self) -> Option<u64> {
        self.resident_bytes()
    }

    /// Memory a run could still obtain (free device memory, or the host's available memory),
    /// in the bytes decisions name; `None` when it cannot be read.
    fn available_bytes(&mut self) -> Option<u64> {
        None
    }
}

/// Refuses, before a run, to carry out on `device` decisions that reach `peak_bytes` (the
/// simulation's peak) when the device has less than that available: a clear error instead of
/// a run the OS kills half way.
pub fn check_room<D: Device + ?Sized>(
    device: &mut D,
    peak_bytes: u64,
    what: &str,
) -> Result<(), String> {
    let Some(available) = device.available_bytes() else {
        return Ok(());
    };
    if peak_bytes <= available {
        return Ok(());
    }
    let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
    Err(format!(
        "{what} reaches {:.2} GiB at its peak (the simulation's reserved bytes), but {} has {:.2} GiB available; run a smaller trace or capacity, or scale the execution down (--execute-scale)",
        gib(peak_bytes),
        device.name(),
        gib(available)
    ))
}

impl<D: Device + ?Sized> Device for Box<D> {
    fn name(&self) -> String {
        (**self).name()
    }
    fn granularity_bytes(&self) -> u64 {
        (**self).granularity_bytes()
    }
    fn serves(&self, device: DeviceId) -> bool {
        (**self).serves(device)
    }
    fn resident_includes(&self, tier: Tier) -> bool {
        (**self).resident_includes(tier)
    }
    fn reserve(&mut self, tier: Tier, bytes: u64) -> Result<u64, DeviceError> {
        (**self).reserve(tier, bytes)
    }
    fn release(&mut self, base: u64) -> Result<(), DeviceError> {
        (**self).release(base)
    }
    fn reserve_va(&mut self, tier: Tier, bytes: u64) -> Result<u64, DeviceError> {
        (**self).reserve_va(tier, bytes)
    }
    fn map(&mut self, base: u64, offset: u64, bytes: u64) -> Result<(), DeviceError> {
        (**self).map(base, offset, bytes)
    }
    fn unmap(&mut self, base: u64, offset: u64, bytes: u64) -> Result<(), DeviceError> {
        (**self).unmap(base, offset, bytes)
    }
    fn release_va(&mut self, base: u64) -> Result<(), DeviceError> {
        (**self).release_va(base)
    }
    fn fill(&mut self, base: u64, offset: u64, bytes: u64, seed: u64) -> Result<(), DeviceError> {
        (**self).fill(base, offset, bytes, seed)
    }
    fn verify(
        &mut self,
        base: u64,
        offset: u64,
        bytes: u64,
        seed: u64,
    ) -> Result<Check, DeviceError> {
        (**self).verify(base, offset, bytes, seed)
    }
    fn copy(&mut self, from: (u64, u64), to: (u64, u64), bytes: u64) -> Result<(), DeviceError> {
        (**self).copy(from, to, bytes)
    }
    fn corrupt(&mut self, base: u64, offset: u64) -> Result<(), DeviceError> {
        (**self).corrupt(base, offset)
    }
    fn resident_bytes(&mut self) -> Option<u64> {
        (**self).resident_bytes()
    }
    fn available_bytes(&mut self) -> Option<u64> {
        (**self).available_bytes()
    }
}

/// `[offset, offset + bytes)` as a checked end, or an `Invalid` error naming `what`.
pub(crate) fn range_end(what: &str, offset: u64, bytes: u64) -> Result<u64, DeviceError> {
    offset
        .checked_add(bytes)
        .ok_or_else(|| DeviceError::invalid(format!("{what}: {offset}+{bytes} overflows")))
}

/// Mapped (accessible) ranges of one region, coalesced: offset → length.
#[derive(Clone, Debug, Default)]
pub(crate) struct Ranges(std::collections::BTreeMap<u64, u64>);

impl Ranges {
    pub(crate) fn whole(bytes: u64) -> Self {
        let mut r = Ranges::default();
        if bytes > 0 {
            r.0.insert(0, bytes);
        }
        r
    }

    /// Whether `[offset, end)` lies inside one accessible range.
    pub(crate) fn covers(&self, offset: u64, end: u64) -> bool {
        self.0
            .range(..=offset)
            .next_back()
            .is_some_and(|(&s, &l)| s <= offset && end <= s + l)
    }

    /// Whether any byte of `[offset, end)` is accessible.
    pub(crate) fn touches(&self, offset: u64, end: u64) -> bool {
        self.0
            .range(..end)
            .next_back()
            .is_some_and(|(&s, &l)| s + l > offset)
    }

    /// Adds `[offset, end)`, which must not touch any accessible byte.
    pub(crate) fn insert(&mut self, offset: u64, end: u64) {
        let mut start = offset;
        let mut len = end - offset;
        if let Some((&s, &l)) = self.0.range(..offset).next_back() {
            if s + l == offset {
                self.0.remove(&s);
                start = s;
                len += l;
            }
        }
        if let Some(l) = self.0.remove(&end) {
            len += l;
        }
        self.0.insert(start, len);
    }

    /// Removes `[offset, end)`, which must be covered.
    pub(crate) fn remove(&mut self, offset: u64, end: u64) {
        let (s, l) = self
            .0
            .range(..=offset)
            .next_back()
            .map(|(&s, &l)| (s, l))
            .expect("remove of a covered range");
        self.0.remove(&s);
        if s < offset {
            self.0.insert(s, offset - s);
        }
        if end < s + l {
            self.0.insert(end, s + l - end);
        }
    }

    pub(crate) fn iter(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.0.iter().map(|(&s, &l)| (s, l))
    }
}

/// What a virtual span is checked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum VaOp {
    Map,
    Unmap,
}

impl VaOp {
    fn name(self) -> &'static str {
        match self {
            VaOp::Map => "map",
            VaOp::Unmap => "unmap",
        }
    }
}

/// One reserved region: a physical segment or a virtual range, in one tier.
#[derive(Clone, Debug)]
pub(crate) struct Region {
    /// Bytes of the region: the bytes asked for of a physical segment, the (rounded) length of
    /// a virtual range.
    pub(crate) len: u64,
    pub(crate) is_virtual: bool,
    pub(crate) tier: Tier,
    /// Accessible ranges: the whole of a physical segment, the mapped pages of a virtual range.
    pub(crate) access: Ranges,
}

impl Region {
    pub(crate) fn physical(tier: Tier, bytes: u64) -> Region {
        Region {
            len: bytes,
            is_virtual: false,
            tier,
            access: Ranges::whole(bytes),
        }
    }

    pub(crate) fn virtual_range(tier: Tier, len: u64) -> Region {
        Region {
            len,
            is_virtual: true,
            tier,
            access: Ranges::default(),
        }
    }
}

/// The regions of one device by base, and every bounds check a device makes before it forms
/// an address: the only place where ranges are checked.
#[derive(Debug, Default)]
pub(crate) struct Regions {
    /// How errors name the device (`host`, `cuda:0 …`).
    pub(crate) device: String,
    map: BTreeMap<u64, Region>,
}

impl Regions {
    pub(crate) fn new(device: impl Into<String>) -> Self {
        Regions {
            device: device.into(),
            map: BTreeMap::new(),
        }
    }

    pub(crate) fn insert(&mut self, base: u64, region: Region) {
        let old = self.map.insert(base, region);
        assert!(
            old.is_none(),
            "{}: base {base:#x} handed out twice",
            self.device
        );
    }

    pub(crate) fn len(&self) -> usize {
        self.map.len()
    }

    pub(crate) fn take_all(&mut self) -> BTreeMap<u64, Region> {
        std::mem::take(&mut self.map)
    }

    pub(crate) fn get(&self, base: u64, what: &str) -> Result<&Region, DeviceError> {
        self.map.get(&base).ok_or_else(|| {
            DeviceError::invalid(format!("{} {what}: unknown base {base:#x}", self.device))
        })
    }

    pub(crate) fn get_mut(&mut self, base: u64, what: &str) -> Result<&mut Region, DeviceError> {
        let device = &self.device;
        self.map
            .get_mut(&base)
            .ok_or_else(|| DeviceError::invalid(format!("{device} {what}: unknown base {base:#x}")))
    }

    /// Removes the region at `base`, which must be virtual or not as asked.
    pub(crate) fn remove(
        &mut self,
        base: u64,
        want_virtual: bool,
        what: &str,
    ) -> Result<Region, DeviceError> {
        let region = self.get(base, what)?;
        if region.is_virtual != want_virtual {
            return Err(DeviceError::invalid(format!(
                "{} {what}: {base:#x} is a {}",
                self.device,
                if region.is_virtual {
                    "virtual range"
                } else {
                    "physical segment"
                }
            )));
        }
        Ok(self.map.remove(&base).expect("checked above"))
    }

    /// The address `base + offset` of `[offset, offset + bytes)`, after checking that the whole
    /// range is accessible, and the region's tier; `None` for an empty range (of a known base).
    pub(crate) fn span(
        &self,
        base: u64,
        offset: u64,
        bytes: u64,
        what: &str,
    ) -> Result<(Option<u64>, Tier), DeviceError> {
        let region = self.get(base, what)?;
        let end = range_end(what, offset, bytes)?;
        if bytes == 0 {
            return Ok((None, region.tier));
        }
        if !region.access.covers(offset, end) {
            return Err(DeviceError::invalid(format!(
                "{} {what}: [{offset}, {end}) of {base:#x} is not inside one mapped range",
                self.device
            )));
        }
        Ok((Some(base + offset), region.tier))
    }

    /// Checks `[offset, offset + bytes)` of the virtual range `base` for a map (nothing mapped
    /// there yet) or an unmap (all of it mapped): not empty, aligned to `granularity`, inside
    /// the range. Returns the end.
    pub(crate) fn virtual_span(
        &self,
        base: u64,
        offset: u64,
        bytes: u64,
        granularity: u64,
        op: VaOp,
    ) -> Result<u64, DeviceError> {
        let what = op.name();
        let device = &self.device;
        let region = self.get(base, what)?;
        if !region.is_virtual {
            return Err(DeviceError::invalid(format!(
                "{device} {what}: {base:#x} is a physical segment, not a virtual range"
            )));
        }
        let end = range_end(what, offset, bytes)?;
        if bytes == 0 {
            return Err(DeviceError::invalid(format!(
                "{device} {what}: empty range"
            )));
        }
        if !offset.is_multiple_of(granularity) || !bytes.is_multiple_of(granularity) {
            return Err(DeviceError::new(
                DeviceErrorKind::Unsupported,
                format!(
                    "{device} {what}: [{offset}, {end}) is not aligned to the \
                     {granularity}-byte allocation granularity"
                ),
            ));
        }
        if end > region.len {
            return Err(DeviceError::invalid(format!(
                "{device} {what}: [{offset}, {end}) outside the {}-byte range {base:#x}",
                region.len
            )));
        }
        if op == VaOp::Map && region.access.touches(offset, end) {
            return Err(DeviceError::invalid(format!(
                "{device} map: [{offset}, {end}) of {base:#x} overlaps mapped pages"
            )));
        }
        if op == VaOp::Unmap && !region.access.covers(offset, end) {
            return Err(DeviceError::invalid(format!(
                "{device} unmap: [{offset}, {end}) of {base:#x} is not all mapped"
            )));
        }
        Ok(end)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_coalesce_and_split() {
        let mut r = Ranges::default();
        r.insert(0, 10);
        r.insert(20, 30);
        r.insert(10, 20);
        assert_eq!(r.iter().collect::<Vec<_>>(), vec![(0, 30)]);
        assert!(r.covers(5, 25));
        r.remove(10, 20);
        assert_eq!(r.iter().collect::<Vec<_>>(), vec![(0, 10), (20, 10)]);
        assert!(!r.covers(5, 25));
        assert!(r.touches(9, 12));
        assert!(!r.touches(10, 20));
        assert!(r.touches(15, 21));
        assert!(Ranges::whole(0).iter().next().is_none());
    }
}
