//! The memory an executor works on: a small, object-safe trait over real device memory.
//!
//! A device hands out *bases*: opaque `u64` handles (host or device addresses) naming a
//! reserved region. Every other call names a base and a byte range inside it; a device checks
//! each range against what it reserved and mapped, and answers an error for anything outside,
//! never touching memory it does not own.

use std::fmt;

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

    /// Obtains `bytes` of physical memory; returns its base.
    fn reserve(&mut self, bytes: u64) -> Result<u64, DeviceError>;
    fn release(&mut self, base: u64) -> Result<(), DeviceError>;
    /// Reserves `bytes` of address space only; returns its base.
    fn reserve_va(&mut self, bytes: u64) -> Result<u64, DeviceError>;
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
    /// Copies `bytes` from `(base, offset)` to `(base, offset)`; the ranges may overlap.
    fn copy(&mut self, from: (u64, u64), to: (u64, u64), bytes: u64) -> Result<(), DeviceError>;
    /// Flips one byte (fault injection).
    fn corrupt(&mut self, base: u64, offset: u64) -> Result<(), DeviceError>;

    /// Memory in use as the device itself reports it (driver used memory, or the process's
    /// resident memory for host memory); `None` when it cannot be read.
    fn resident_bytes(&mut self) -> Option<u64>;
}

impl<D: Device + ?Sized> Device for Box<D> {
    fn name(&self) -> String {
        (**self).name()
    }
    fn granularity_bytes(&self) -> u64 {
        (**self).granularity_bytes()
    }
    fn reserve(&mut self, bytes: u64) -> Result<u64, DeviceError> {
        (**self).reserve(bytes)
    }
    fn release(&mut self, base: u64) -> Result<(), DeviceError> {
        (**self).release(base)
    }
    fn reserve_va(&mut self, bytes: u64) -> Result<u64, DeviceError> {
        (**self).reserve_va(bytes)
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
