//! [`Scaled`]: a device that carries out every decision at 1/`factor` of its size, so that a
//! trace holding gigabytes can be executed and verified in megabytes (tests, small machines).
//!
//! A block of `bytes` at `offset` occupies `[offset / f, offset / f + bytes / f)` on the inner
//! device (integer division). Every decision about a block names the same offset and size, so
//! it always maps to the same scaled range, and scaling keeps blocks apart:
//! `⌊a/f⌋ + ⌊b/f⌋ ≤ ⌊(a+b)/f⌋`, so two blocks that did not overlap still do not. A segment of
//! `bytes` reserves `⌈bytes/f⌉`, which holds every scaled block inside it; a virtual range is
//! mapped in whole scaled pages, so the device's granularity is the inner one times `f`.
//!
//! What is lost: a block smaller than `f` bytes becomes empty and is not verified, and a
//! corrupted byte in the last `bytes mod f` bytes of a block falls outside its scaled range.
//! With `f` at most the allocation alignment (512 B by default) neither happens. Resident
//! memory cannot be compared with the books at another scale: it reads as unknown.

use gpumem_core::place::{DeviceId, Tier};

use crate::device::{Check, Device, DeviceError, DeviceErrorKind};

/// Largest scale factor accepted: beyond it a 2 MiB page is smaller than a host page.
pub const MAX_SCALE: u64 = 512;

/// A device whose sizes and offsets are divided by a factor; see the module documentation.
pub struct Scaled<D: Device> {
    inner: D,
    factor: u64,
}

impl<D: Device> Scaled<D> {
    /// `inner` at 1/`factor` of every size (`factor` from 1 to [`MAX_SCALE`], a power of two).
    pub fn new(inner: D, factor: u64) -> Result<Self, String> {
        if !(1..=MAX_SCALE).contains(&factor) || !factor.is_power_of_two() {
            return Err(format!(
                "scale {factor}: must be a power of two from 1 to {MAX_SCALE}"
            ));
        }
        Ok(Scaled { inner, factor })
    }

    pub fn inner(&self) -> &D {
        &self.inner
    }

    /// The scaled range of a block: start and length.
    fn block(&self, offset: u64, bytes: u64) -> (u64, u64) {
        (offset / self.factor, bytes / self.factor)
    }

    /// An exact division for map offsets and sizes, or why not.
    fn exact(&self, what: &str, value: u64) -> Result<u64, DeviceError> {
        if value.is_multiple_of(self.factor) {
            Ok(value / self.factor)
        } else {
            Err(DeviceError::new(
                DeviceErrorKind::Unsupported,
                format!(
                    "{what} {value} is not a multiple of the scale {}",
                    self.factor
                ),
            ))
        }
    }
}

impl<D: Device> Device for Scaled<D> {
    fn name(&self) -> String {
        match self.factor {
            1 => self.inner.name(),
            f => format!("{} (sizes / {f})", self.inner.name()),
        }
    }

    fn granularity_bytes(&self) -> u64 {
        self.inner.granularity_bytes().saturating_mul(self.factor)
    }

    fn serves(&self, device: DeviceId) -> bool {
        self.inner.serves(device)
    }

    fn resident_includes(&self, tier: Tier) -> bool {
        self.inner.resident_includes(tier)
    }

    fn reserve(&mut self, tier: Tier, bytes: u64) -> Result<u64, DeviceError> {
        self.inner.reserve(tier, bytes.div_ceil(self.factor))
    }

    fn release(&mut self, base: u64) -> Result<(), DeviceError> {
        self.inner.release(base)
    }

    fn reserve_va(&mut self, tier: Tier, bytes: u64) -> Result<u64, DeviceError> {
        self.inner.reserve_va(tier, bytes.div_ceil(self.factor))
    }

    fn map(&mut self, base: u64, offset: u64, bytes: u64) -> Result<(), DeviceError> {
        let (o, n) = (
            self.exact("map offset", offset)?,
            self.exact("map size", bytes)?,
        );
        self.inner.map(base, o, n)
    }

    fn unmap(&mut self, base: u64, offset: u64, bytes: u64) -> Result<(), DeviceError> {
        let (o, n) = (
            self.exact("unmap offset", offset)?,
            self.exact("unmap size", bytes)?,
        );
        self.inner.unmap(base, o, n)
    }

    fn release_va(&mut self, base: u64) -> Result<(), DeviceError> {
        self.inner.release_va(base)
    }

    fn fill(&mut self, base: u64, offset: u64, bytes: u64, seed: u64) -> Result<(), DeviceError> {
        let (o, n) = self.block(offset, bytes);
        self.inner.fill(base, o, n, seed)
    }

    fn verify(
        &mut self,
        base: u64,
        offset: u64,
        bytes: u64,
        seed: u64,
    ) -> Result<Check, DeviceError> {
        let (o, n) = self.block(offset, bytes);
        let mut check = self.inner.verify(base, o, n, seed)?;
        // Where in the unscaled block the first wrong byte stands (to within the factor).
        check.first_mismatch = check.first_mismatch.map(|i| i * self.factor);
        Ok(check)
    }

    fn copy(&mut self, from: (u64, u64), to: (u64, u64), bytes: u64) -> Result<(), DeviceError> {
        let (src, n) = self.block(from.1, bytes);
        let (dst, _) = self.block(to.1, bytes);
        self.inner.copy((from.0, src), (to.0, dst), n)
    }

    fn corrupt(&mut self, base: u64, offset: u64) -> Result<(), DeviceError> {
        self.inner.corrupt(base, offset / self.factor)
    }

    fn resident_bytes(&mut self) -> Option<u64> {
        None
    }

    /// The inner device's, as measured: what a sleep gives back shows at its real size.
    fn resident_bytes_measured(&mut self) -> Option<u64> {
        self.inner.resident_bytes_measured()
    }

    /// In the bytes decisions name: each of them takes 1/factor on the inner device.
    fn available_bytes(&mut self) -> Option<u64> {
        self.inner
            .available_bytes()
            .map(|b| b.saturating_mul(self.factor))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::HostDevice;

    const MIB: u64 = 1 << 20;

    #[test]
    fn blocks_keep_their_bytes_and_stay_apart() {
        let mut d = Scaled::new(HostDevice::new(), 64).unwrap();
        let base = d.reserve(Tier::Gpu, 4 * MIB).unwrap();
        // Two neighbours whose sizes are not multiples of the factor.
        d.fill(base, 0, 1000, 1).unwrap();
        d.fill(base, 1000, 3000, 2).unwrap();
        assert_eq!(d.verify(base, 0, 1000, 1).unwrap().mismatched_bytes, 0);
        assert_eq!(d.verify(base, 1000, 3000, 2).unwrap().mismatched_bytes, 0);
        // A move keeps the block's bytes at its new place.
        d.copy((base, 1000), (base, 2 * MIB + 512), 3000).unwrap();
        assert_eq!(
            d.verify(base, 2 * MIB + 512, 3000, 2)
                .unwrap()
                .mismatched_bytes,
            0
        );
        d.corrupt(base, 1000 + 128).unwrap();
        let check = d.verify(base, 1000, 3000, 2).unwrap();
        assert_eq!(check.mismatched_bytes, 1);
        assert_eq!(check.first_mismatch, Some(128));
        // The last byte of the segment is still inside the scaled segment.
        d.fill(base, 4 * MIB - 64, 64, 3).unwrap();
        assert!(d.fill(base, 4 * MIB, 64, 3).is_err());
    }

    #[test]
    fn maps_are_whole_scaled_pages() {
        let mut d = Scaled::new(HostDevice::new(), 16).unwrap();
        let g = d.granularity_bytes();
        assert_eq!(g, 16 * HostDevice::new().granularity_bytes());
        let base = d.reserve_va(Tier::Gpu, 64 * g).unwrap();
        d.map(base, 2 * g, 2 * g).unwrap();
        d.fill(base, 2 * g + 100, g, 9).unwrap();
        assert_eq!(
            d.verify(base, 2 * g + 100, g, 9).unwrap().mismatched_bytes,
            0
        );
        let e = d.map(base, 8 * g + 3, g).unwrap_err();
        assert_eq!(e.kind, DeviceErrorKind::Unsupported);
        d.unmap(base, 2 * g, 2 * g).unwrap();
        assert!(d.verify(base, 2 * g + 100, g, 9).is_err());
        d.release_va(base).unwrap();
    }

    #[test]
    fn only_powers_of_two_up_to_the_maximum() {
        for bad in [0, 3, 1000, 2 * MAX_SCALE] {
            assert!(Scaled::new(HostDevice::new(), bad).is_err(), "{bad}");
        }
        assert!(Scaled::new(HostDevice::new(), MAX_SCALE).is_ok());
    }
}
