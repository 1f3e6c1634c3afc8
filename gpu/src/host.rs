//! [`HostDevice`]: decisions carried out on real host memory through `mmap`.
//!
//! A physical segment is an anonymous private mapping; a virtual range is address space mapped
//! `PROT_NONE` whose pages become readable and writable on `map` and are dropped
//! (`MADV_DONTNEED`) and made inaccessible again on `unmap`. Pages are committed lazily, as the
//! OS does for any anonymous memory, so the resident memory grows when blocks are written.
//!
//! Every access is checked against a table of what was mapped (base → length and accessible
//! ranges) before a pointer is formed: a wrong base, offset or size becomes a [`DeviceError`],
//! never a read or write of memory this device does not hold.

use std::io;

use gpumem_core::place::{DeviceId, Tier};

use crate::device::{Check, Device, DeviceError, DeviceErrorKind, Region, Regions, VaOp};
use crate::pattern;

/// Size of a transparent huge page on x86-64 and most arm64 kernels; the usual GPU allocation
/// granularity, and the page size of the policies' virtual ranges.
const HUGE_PAGE: u64 = 2 << 20;

/// Asks for transparent huge pages over `[ptr, ptr + len)`: a first touch then faults in 2 MiB
/// at a time instead of 4 KiB (more than ten times faster to fill fresh memory). Advisory only.
#[cfg(target_os = "linux")]
fn advise_huge_pages(ptr: *mut u8, len: u64) {
    // SAFETY: `ptr`/`len` are a page-aligned part of one of our own mappings; the advice only
    // changes how the kernel backs it.
    unsafe { libc::madvise(ptr.cast(), len as usize, libc::MADV_HUGEPAGE) };
}

#[cfg(not(target_os = "linux"))]
fn advise_huge_pages(_ptr: *mut u8, _len: u64) {}

/// Host memory as a [`Device`]. Every tier is host memory here, each region its own mapping
/// (a region's base is its address), and it stands in for any number of devices.
pub struct HostDevice {
    page: u64,
    regions: Regions,
}

// SAFETY: a `HostDevice` exclusively owns the mappings its raw pointers point into; nothing
// about them is tied to the thread that created them, and all access goes through `&mut self`.
unsafe impl Send for HostDevice {}

impl Default for HostDevice {
    fn default() -> Self {
        Self::new()
    }
}

fn os_error(what: String) -> DeviceError {
    let err = io::Error::last_os_error();
    let kind = match err.raw_os_error() {
        Some(libc::ENOMEM) | Some(libc::EAGAIN) => DeviceErrorKind::OutOfMemory,
        _ => DeviceErrorKind::Driver,
    };
    DeviceError::new(kind, format!("{what}: {err}"))
}

impl HostDevice {
    pub fn new() -> Self {
        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        HostDevice {
            page: u64::try_from(page).ok().filter(|&p| p > 0).unwrap_or(4096),
            regions: Regions::new("host"),
        }
    }

    /// Number of regions (segments and virtual ranges) currently held.
    pub fn region_count(&self) -> usize {
        self.regions.len()
    }

    fn mmap(
        &mut self,
        tier: Tier,
        bytes: u64,
        prot: libc::c_int,
        what: &str,
    ) -> Result<u64, DeviceError> {
        if tier == Tier::Disk {
            return Err(DeviceError::new(
                DeviceErrorKind::Unsupported,
                format!("host {what} of {bytes} bytes: the disk tier is not executed on memory"),
            ));
        }
        let too_large = || {
            DeviceError::new(
                DeviceErrorKind::OutOfMemory,
                format!("host {what} of {bytes} bytes: larger than the address space"),
            )
        };
        let len = bytes
            .max(1)
            .checked_next_multiple_of(self.page)
            .filter(|&l| l <= isize::MAX as u64)
            .ok_or_else(too_large)?;
        // Regions of a huge page or more start on a huge-page boundary (map a little more, trim
        // the ends), so that 2 MiB pages of a policy are 2 MiB pages of the OS.
        let huge = len >= HUGE_PAGE && self.page < HUGE_PAGE;
        let span = if huge {
            len.checked_add(HUGE_PAGE - self.page)
                .filter(|&l| l <= isize::MAX as u64)
                .ok_or_else(too_large)?
        } else {
            len
        };
        // SAFETY: an anonymous private mapping at an address the kernel chooses aliases no
        // existing memory; `span` is non-zero and fits in isize.
        let raw = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                span as usize,
                prot,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if raw == libc::MAP_FAILED {
            return Err(os_error(format!("host {what} of {bytes} bytes (mmap)")));
        }
        let mut ptr = raw.cast::<u8>();
        if huge {
            let head = (ptr as u64).next_multiple_of(HUGE_PAGE) - ptr as u64;
            let tail = span - head - len;
            // SAFETY: `head + len + tail == span`: the head and the tail are page-aligned parts
            // of the mapping just made, which nothing refers to; `ptr + head` stays inside it.
            unsafe {
                if head > 0 {
                    libc::munmap(ptr.cast(), head as usize);
                }
                ptr = ptr.add(head as usize);
                if tail > 0 {
                    libc::munmap(ptr.add(len as usize).cast(), tail as usize);
                }
            }
            advise_huge_pages(ptr, len);
        }
        let base = ptr as u64;
        let region = if prot == libc::PROT_NONE {
            Region::virtual_range(tier, len)
        } else {
            Region::physical(tier, bytes)
        };
        self.regions.insert(base, region);
        Ok(base)
    }

    /// Length of the mapping behind a region: what was asked, in whole pages (at least one).
    fn mapping_len(&self, region: &Region) -> u64 {
        region.len.max(1).next_multiple_of(self.page)
    }

    /// A pointer to `[offset, offset + bytes)` of `base`, after `Regions` checked that the
    /// whole range is accessible; `None` for an empty range (of a known base).
    fn span(
        &self,
        base: u64,
        offset: u64,
        bytes: u64,
        what: &str,
    ) -> Result<Option<*mut u8>, DeviceError> {
        let (addr, _) = self.regions.span(base, offset, bytes, what)?;
        // The base is the address of our own mapping and the range was checked to lie in it.
        Ok(addr.map(|a| a as *mut u8))
    }

    fn munmap(&mut self, base: u64, want_virtual: bool, what: &str) -> Result<(), DeviceError> {
        let region = self.regions.remove(base, want_virtual, what)?;
        let len = self.mapping_len(&region);
        // SAFETY: `base`/`len` are exactly a mapping this device created and still owned; it
        // was just removed from the table, so no later call can reach it.
        if unsafe { libc::munmap(base as *mut libc::c_void, len as usize) } != 0 {
            return Err(os_error(format!("host {what} of {base:#x} (munmap)")));
        }
        Ok(())
    }
}

impl Device for HostDevice {
    fn name(&self) -> String {
        "host".to_string()
    }

    fn granularity_bytes(&self) -> u64 {
        self.page
    }

    fn serves(&self, _device: DeviceId) -> bool {
        true
    }

    fn resident_includes(&self, _tier: Tier) -> bool {
        true
    }

    fn reserve(&mut self, tier: Tier, bytes: u64) -> Result<u64, DeviceError> {
        self.mmap(tier, bytes, libc::PROT_READ | libc::PROT_WRITE, "reserve")
    }

    fn release(&mut self, base: u64) -> Result<(), DeviceError> {
        self.munmap(base, false, "release")
    }

    fn reserve_va(&mut self, tier: Tier, bytes: u64) -> Result<u64, DeviceError> {
        self.mmap(tier, bytes, libc::PROT_NONE, "reserve_va")
    }

    fn map(&mut self, base: u64, offset: u64, bytes: u64) -> Result<(), DeviceError> {
        let end = self
            .regions
            .virtual_span(base, offset, bytes, self.page, VaOp::Map)?;
        // SAFETY: the page-aligned range [offset, end) lies inside this device's own mapping
        // (checked by `virtual_span`); changing its protection affects no other memory.
        let rc = unsafe {
            libc::mprotect(
                (base + offset) as *mut libc::c_void,
                bytes as usize,
                libc::PROT_READ | libc::PROT_WRITE,
            )
        };
        if rc != 0 {
            return Err(os_error(format!("host map [{offset}, {end}) of {base:#x}")));
        }
        self.regions
            .get_mut(base, "map")?
            .access
            .insert(offset, end);
        Ok(())
    }

    fn unmap(&mut self, base: u64, offset: u64, bytes: u64) -> Result<(), DeviceError> {
        let end = self
            .regions
            .virtual_span(base, offset, bytes, self.page, VaOp::Unmap)?;
        // SAFETY: as in `map`: a page-aligned range inside our own mapping. Dropping its pages
        // (they read as zero afterwards) and then revoking access touches nothing else; no
        // reference into the range outlives a `&mut self` call.
        unsafe {
            let p = (base + offset) as *mut libc::c_void;
            if libc::madvise(p, bytes as usize, libc::MADV_DONTNEED) != 0 {
                return Err(os_error(format!("host unmap [{offset}, {end}) (madvise)")));
            }
            if libc::mprotect(p, bytes as usize, libc::PROT_NONE) != 0 {
                return Err(os_error(format!("host unmap [{offset}, {end}) (mprotect)")));
            }
        }
        self.regions
            .get_mut(base, "unmap")?
            .access
            .remove(offset, end);
        Ok(())
    }

    fn release_va(&mut self, base: u64) -> Result<(), DeviceError> {
        self.munmap(base, true, "release_va")
    }

    fn fill(&mut self, base: u64, offset: u64, bytes: u64, seed: u64) -> Result<(), DeviceError> {
        if let Some(p) = self.span(base, offset, bytes, "fill")? {
            // SAFETY: `span` checked that all `bytes` from `p` are mapped read-write and belong
            // to this device; `&mut self` guarantees no other reference into them exists.
            let block = unsafe { std::slice::from_raw_parts_mut(p, bytes as usize) };
            pattern::fill(block, seed, 0);
        }
        Ok(())
    }

    fn verify(
        &mut self,
        base: u64,
        offset: u64,
        bytes: u64,
        seed: u64,
    ) -> Result<Check, DeviceError> {
        let Some(p) = self.span(base, offset, bytes, "verify")? else {
            return Ok(Check::default());
        };
        // SAFETY: as in `fill`; the slice is only read.
        let block = unsafe { std::slice::from_raw_parts(p, bytes as usize) };
        Ok(pattern::check(block, seed))
    }

    fn copy(&mut self, from: (u64, u64), to: (u64, u64), bytes: u64) -> Result<(), DeviceError> {
        let src = self.span(from.0, from.1, bytes, "copy source")?;
        let dst = self.span(to.0, to.1, bytes, "copy destination")?;
        if let (Some(src), Some(dst)) = (src, dst) {
            // SAFETY: both ranges were checked to be mapped read-write memory of this device;
            // `ptr::copy` is a memmove, correct for overlapping ranges.
            unsafe { std::ptr::copy(src, dst, bytes as usize) };
        }
        Ok(())
    }

    fn corrupt(&mut self, base: u64, offset: u64) -> Result<(), DeviceError> {
        if let Some(p) = self.span(base, offset, 1, "corrupt")? {
            // SAFETY: `span` checked that this one byte is mapped read-write memory we own.
            unsafe { *p = !*p };
        }
        Ok(())
    }

    fn available_bytes(&mut self) -> Option<u64> {
        // /proc/meminfo: `MemAvailable:   12345678 kB`.
        let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
        let line = meminfo.lines().find(|l| l.starts_with("MemAvailable:"))?;
        let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
        kib.checked_mul(1024)
    }

    fn resident_bytes(&mut self) -> Option<u64> {
        // /proc/self/statm: size resident shared text lib data dt, in pages.
        let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
        let resident: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
        resident.checked_mul(self.page)
    }

    /// The exact figure: `Rss:` of `/proc/self/smaps_rollup`, which walks the page tables.
    /// statm's counter is cheap but approximate (per-CPU deltas not yet folded in); on a busy
    /// machine it was seen to miss a whole sleep's release of several MiB. Falls back to it.
    fn resident_bytes_measured(&mut self) -> Option<u64> {
        let exact = std::fs::read_to_string("/proc/self/smaps_rollup")
            .ok()
            .and_then(|rollup| {
                let line = rollup.lines().find(|l| l.starts_with("Rss:"))?;
                let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
                kib.checked_mul(1024)
            });
        exact.or_else(|| self.resident_bytes())
    }
}

impl Drop for HostDevice {
    fn drop(&mut self) {
        for (base, region) in self.regions.take_all() {
            let len = self.mapping_len(&region);
            // SAFETY: each region is a mapping this device created and still owns; the table
            // is emptied, so nothing can reach them afterwards.
            unsafe { libc::munmap(base as *mut libc::c_void, len as usize) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    #[test]
    fn physical_segment_fill_verify_copy_corrupt() {
        let mut d = HostDevice::new();
        let base = d.reserve(Tier::Gpu, 3 * MIB + 5).unwrap();
        d.fill(base, 100, 1000, 7).unwrap();
        assert_eq!(d.verify(base, 100, 1000, 7).unwrap(), Check::default());
        // Overlapping copy up by 10 bytes keeps the block's bytes.
        d.copy((base, 100), (base, 110), 1000).unwrap();
        assert_eq!(d.verify(base, 110, 1000, 7).unwrap().mismatched_bytes, 0);
        d.corrupt(base, 110 + 999).unwrap();
        let check = d.verify(base, 110, 1000, 7).unwrap();
        assert_eq!(check.mismatched_bytes, 1);
        assert_eq!(check.first_mismatch, Some(999));
        // The last requested byte is accessible, the next one is not.
        d.fill(base, 3 * MIB + 4, 1, 1).unwrap();
        let err = d.fill(base, 3 * MIB + 4, 2, 1).unwrap_err();
        assert_eq!(err.kind, DeviceErrorKind::Invalid);
        assert!(d.verify(base + 1, 0, 1, 1).is_err());
        assert!(d.fill(base, u64::MAX, 2, 1).is_err());
        assert!(d.map(base, 0, MIB).is_err(), "map of a physical segment");
        assert!(d.release_va(base).is_err());
        d.release(base).unwrap();
        assert!(d.verify(base, 0, 1, 1).is_err(), "released memory is gone");
        assert_eq!(d.region_count(), 0);
    }

    #[test]
    fn virtual_range_map_unmap() {
        let mut d = HostDevice::new();
        let base = d.reserve_va(Tier::Gpu, 64 * MIB).unwrap();
        assert!(d.fill(base, 0, 8, 1).is_err(), "nothing is mapped yet");
        d.map(base, 2 * MIB, 2 * MIB).unwrap();
        d.map(base, 4 * MIB, 2 * MIB).unwrap();
        // A block spanning two separately mapped pages.
        d.fill(base, 3 * MIB, 2 * MIB, 9).unwrap();
        assert_eq!(
            d.verify(base, 3 * MIB, 2 * MIB, 9)
                .unwrap()
                .mismatched_bytes,
            0
        );
        assert!(d.map(base, 4 * MIB, 2 * MIB).is_err(), "mapped twice");
        assert!(d.map(base, 6 * MIB + 1, 2 * MIB).is_err(), "unaligned");
        assert!(d.map(base, 64 * MIB, 2 * MIB).is_err(), "outside the range");
        assert!(d.unmap(base, 0, 4 * MIB).is_err(), "not all mapped");
        d.unmap(base, 4 * MIB, 2 * MIB).unwrap();
        assert!(d.verify(base, 3 * MIB, 2 * MIB, 9).is_err());
        // Remapped pages read as zeros: the old contents were dropped.
        d.map(base, 4 * MIB, 2 * MIB).unwrap();
        let check = d.verify(base, 4 * MIB, MIB, 9).unwrap();
        assert!(check.mismatched_bytes > MIB - MIB / 64);
        assert!(d.release(base).is_err(), "release of a virtual range");
        d.release_va(base).unwrap();
    }

    #[test]
    fn refusal_of_impossible_reservations() {
        let mut d = HostDevice::new();
        let err = d.reserve(Tier::Gpu, u64::MAX).unwrap_err();
        assert_eq!(err.kind, DeviceErrorKind::OutOfMemory);
        let err = d.reserve(Tier::Gpu, 1 << 62).unwrap_err();
        assert_eq!(err.kind, DeviceErrorKind::OutOfMemory, "{err}");
        assert!(err.to_string().contains("mmap"), "{err}");
        // Zero bytes still gives a distinct base.
        let a = d.reserve(Tier::Gpu, 0).unwrap();
        let b = d.reserve(Tier::Gpu, 0).unwrap();
        assert_ne!(a, b);
        assert_eq!(d.verify(a, 0, 0, 0).unwrap(), Check::default());
    }
}
