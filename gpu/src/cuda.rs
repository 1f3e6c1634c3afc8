//! [`CudaDevice`]: decisions carried out on CUDA device memory through the driver API (cudarc,
//! loaded dynamically, so that a machine without a driver still builds and runs everything
//! else).
//!
//! - `reserve`/`release`: `cuMemAlloc_v2`/`cuMemFree_v2` (not the stream-ordered pool, so that
//!   the driver's free memory follows reservations at once);
//! - `reserve_va`/`map`/`unmap`/`release_va`: the virtual memory API. `map` backs every
//!   granularity page with its own physical allocation (`cuMemCreate`, `cuMemMap`,
//!   `cuMemSetAccess`), so that any whole pages can be unmapped later on their own. The handle
//!   is released right after mapping: the mapping keeps the memory alive and `cuMemUnmap` frees
//!   it, as the driver documents, so no handle has to be remembered;
//! - `fill`/`verify`: the pattern through an 8 MiB pinned host staging buffer;
//! - host tiers: pinned host memory from `cuMemAllocHost_v2`, pageable host memory from the
//!   Rust allocator; patterns are written and checked there directly;
//! - `copy`: `cuMemcpyDtoD_v2` within device memory (through a device scratch buffer in the
//!   safe direction when the two ranges overlap), `cuMemcpyAsync` on the null stream between
//!   device and pinned host memory, `cuMemcpyHtoD_v2`/`DtoH_v2` with pageable memory, and a
//!   plain copy between host tiers; every copy is complete when `copy` returns;
//! - `resident_bytes`: total − free from `cuMemGetInfo_v2`.
//!
//! Like [`crate::host::HostDevice`], every range is checked against what was reserved and
//! mapped before the driver is asked to touch it.

use std::collections::BTreeMap;
use std::ffi::c_void;
use std::sync::Arc;

use cudarc::driver::sys;
use cudarc::driver::{CudaContext, DriverError};

use gpumem_core::place::{DeviceId, Tier};

use crate::device::{Check, Device, DeviceError, DeviceErrorKind, Region, Regions, VaOp};
use crate::pattern::{self, STAGING_BYTES};

/// Message of the error [`CudaDevice::open`] returns where libcuda cannot be loaded.
pub const NO_DRIVER: &str =
    "no CUDA driver: libcuda could not be loaded on this machine; use --execute host";

/// The granularity a device without virtual memory management reports (it maps nothing).
const NOMINAL_GRANULARITY: u64 = 2 << 20;

/// Device bytes kept for copies between overlapping ranges.
const SCRATCH_BYTES: u64 = 8 << 20;

fn driver_error(what: impl FnOnce() -> String, e: DriverError) -> DeviceError {
    let kind = if e.0 == sys::CUresult::CUDA_ERROR_OUT_OF_MEMORY {
        DeviceErrorKind::OutOfMemory
    } else {
        DeviceErrorKind::Driver
    };
    DeviceError::new(kind, format!("{}: {e}", what()))
}

fn check(r: sys::CUresult, what: impl FnOnce() -> String) -> Result<(), DeviceError> {
    r.result().map_err(|e| driver_error(what, e))
}

/// Whether a CUDA driver library can be loaded here. Never panics.
pub fn driver_present() -> bool {
    // SAFETY: only tries to load the library (and unloads it again); no CUDA call is made.
    unsafe { sys::is_culib_present() }
}

enum Staging {
    /// Page-locked host memory from `cuMemAllocHost_v2` (not write-combined: it is read back).
    Pinned(*mut u8),
    /// Fallback where pinned memory could not be had.
    Pageable(Vec<u8>),
}

/// One CUDA device as a [`Device`].
pub struct CudaDevice {
    ctx: Arc<CudaContext>,
    name: String,
    cu_device: sys::CUdevice,
    granularity: u64,
    /// Whether the device supports the virtual memory management API (`cuMemCreate`, …).
    virtual_memory: bool,
    /// Whether host and device share one address space, so that a pinned host pointer can be
    /// handed to `cuMemcpyAsync` as is (every 64-bit Linux GPU of the last decade; checked).
    unified_addressing: bool,
    regions: Regions,
    /// Pageable host regions by base (their address).
    pageable: BTreeMap<u64, Vec<u8>>,
    staging: Staging,
    scratch: sys::CUdeviceptr,
}

// SAFETY: the context is `Send`; the staging buffer and every device pointer are owned
// exclusively by this value and used only through `&mut self`, and every call binds the
// context to the calling thread first.
unsafe impl Send for CudaDevice {}

impl CudaDevice {
    /// Opens device `ordinal`. Where no driver can be loaded this returns an error saying so
    /// (cudarc would panic on first use).
    pub fn open(ordinal: usize) -> Result<CudaDevice, DeviceError> {
        if !driver_present() {
            return Err(DeviceError::new(DeviceErrorKind::NoDriver, NO_DRIVER));
        }
        let ctx = CudaContext::new(ordinal)
            .map_err(|e| driver_error(|| format!("cuda:{ordinal}: cannot open the device"), e))?;
        let name = ctx
            .name()
            .map_err(|e| driver_error(|| format!("cuda:{ordinal}: device name"), e))?;
        let cu_device = ctx.cu_device();
        let name = format!("cuda:{ordinal} {name}");
        let mut dev = CudaDevice {
            ctx,
            regions: Regions::new(name.clone()),
            pageable: BTreeMap::new(),
            name,
            cu_device,
            granularity: 0,
            virtual_memory: false,
            unified_addressing: false,
            staging: Staging::Pageable(Vec::new()),
            scratch: 0,
        };
        // Some vGPU and WSL setups lack the virtual memory management API: everything but
        // virtual ranges still runs there.
        dev.virtual_memory = dev
            .ctx
            .attribute(
                sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED,
            )
            .map_err(|e| driver_error(|| format!("{}: VMM support attribute", dev.name), e))?
            == 1;
        dev.granularity = if dev.virtual_memory {
            let prop = dev.prop();
            let mut granularity = 0usize;
            // SAFETY: both pointers point to live locals of the right types.
            check(
                unsafe {
                    sys::cuMemGetAllocationGranularity(
                        &mut granularity,
                        &prop,
                        sys::CUmemAllocationGranularity_flags::CU_MEM_ALLOC_GRANULARITY_MINIMUM,
                    )
                },
                || format!("{}: cuMemGetAllocationGranularity", dev.name),
            )?;
            (granularity as u64).max(1)
        } else {
            NOMINAL_GRANULARITY
        };
        dev.unified_addressing = dev
            .ctx
            .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_UNIFIED_ADDRESSING)
            .map_err(|e| {
                driver_error(|| format!("{}: unified addressing attribute", dev.name), e)
            })?
            == 1;

        let mut host: *mut c_void = std::ptr::null_mut();
        // SAFETY: `host` is a valid out-pointer; on success it owns STAGING_BYTES bytes that
        // `Drop` frees with cuMemFreeHost.
        let pinned = unsafe { sys::cuMemAllocHost_v2(&mut host, STAGING_BYTES) };
        dev.staging = if pinned == sys::CUresult::CUDA_SUCCESS && !host.is_null() {
            Staging::Pinned(host.cast())
        } else {
            Staging::Pageable(vec![0u8; STAGING_BYTES])
        };

        let mut scratch: sys::CUdeviceptr = 0;
        // SAFETY: valid out-pointer; on success `Drop` frees it with cuMemFree_v2.
        check(
            unsafe { sys::cuMemAlloc_v2(&mut scratch, SCRATCH_BYTES as usize) },
            || format!("{}: scratch buffer", dev.name),
        )?;
        dev.scratch = scratch;
        Ok(dev)
    }

    fn prop(&self) -> sys::CUmemAllocationProp {
        sys::CUmemAllocationProp {
            type_: sys::CUmemAllocationType::CU_MEM_ALLOCATION_TYPE_PINNED,
            requestedHandleTypes: sys::CUmemAllocationHandleType::CU_MEM_HANDLE_TYPE_NONE,
            location: sys::CUmemLocation {
                type_: sys::CUmemLocationType::CU_MEM_LOCATION_TYPE_DEVICE,
                id: self.cu_device,
            },
            win32HandleMetaData: std::ptr::null_mut(),
            allocFlags: sys::CUmemAllocationProp_st__bindgen_ty_1 {
                compressionType: 0,
                gpuDirectRDMACapable: 0,
                usage: 0,
                reserved: [0; 4],
            },
        }
    }

    fn bind(&self) -> Result<(), DeviceError> {
        self.ctx
            .bind_to_thread()
            .map_err(|e| driver_error(|| format!("{}: bind context", self.name), e))
    }

    fn staging(&mut self) -> &mut [u8] {
        match &mut self.staging {
            // SAFETY: the pointer owns STAGING_BYTES bytes of pinned host memory, exclusively
            // ours; the returned borrow is tied to `&mut self`.
            Staging::Pinned(p) => unsafe { std::slice::from_raw_parts_mut(*p, STAGING_BYTES) },
            Staging::Pageable(v) => v,
        }
    }

    /// Address of `[offset, offset + bytes)` of `base` (device memory or host memory, as the
    /// tier says), after `Regions` checked the whole range is accessible; `None` for an empty
    /// range (of a known base).
    fn span(
        &self,
        base: u64,
        offset: u64,
        bytes: u64,
        what: &str,
    ) -> Result<(Option<sys::CUdeviceptr>, Tier), DeviceError> {
        self.regions.span(base, offset, bytes, what)
    }

    /// Unmaps the pages of `[offset, end)` of the virtual range `base`, each mapped on its own
    /// by `map_pages`, and takes each page out of the table once the driver has unmapped it: a
    /// page the driver fails to unmap stays in the table (still mapped, still owned, freed by a
    /// later call or at drop). Returns the first error.
    fn unmap_pages(&mut self, base: u64, offset: u64, end: u64) -> Result<(), DeviceError> {
        let g = self.granularity;
        let mut first_err = Ok(());
        for page in (offset..end).step_by(g as usize) {
            // SAFETY: [base + page, +g) is one whole mapping created by `map_pages`.
            let r = unsafe { sys::cuMemUnmap(base + page, g as usize) };
            match check(r, || format!("{} cuMemUnmap {base:#x}+{page}", self.name)) {
                Ok(()) => {
                    if let Ok(region) = self.regions.get_mut(base, "unmap") {
                        region.access.remove(page, page + g);
                    }
                }
                Err(e) if first_err.is_ok() => first_err = Err(e),
                Err(_) => {}
            }
        }
        first_err
    }

    /// Backs the one page at `addr` with a fresh physical allocation (not yet accessible).
    fn map_page(&self, prop: &sys::CUmemAllocationProp, addr: u64) -> Result<(), DeviceError> {
        let g = self.granularity as usize;
        let name = &self.name;
        let mut handle: sys::CUmemGenericAllocationHandle = 0;
        // SAFETY: valid out-pointer and property struct; `g` is the granularity.
        check(unsafe { sys::cuMemCreate(&mut handle, g, prop, 0) }, || {
            format!("{name} map: cuMemCreate of {g} bytes")
        })?;
        // SAFETY: [addr, addr + g) lies in our reserved, unmapped address range (checked by the
        // caller); `handle` is a fresh allocation of `g` bytes.
        let mapped = check(unsafe { sys::cuMemMap(addr, g, 0, handle, 0) }, || {
            format!("{name} map: cuMemMap at {addr:#x}")
        });
        // The mapping holds its own reference to the memory, so the handle can go now; if the
        // mapping failed, this frees the allocation.
        // SAFETY: `handle` came from cuMemCreate above and is released exactly once.
        let released = check(unsafe { sys::cuMemRelease(handle) }, || {
            format!("{name} map: cuMemRelease")
        });
        mapped?;
        if let Err(e) = released {
            // SAFETY: undo the mapping just made; nothing else refers to it.
            unsafe { sys::cuMemUnmap(addr, g) };
            return Err(e);
        }
        Ok(())
    }

    /// Maps one physical allocation per page over `[offset, end)` (so that any whole pages can
    /// be unmapped later on their own), then makes the whole range readable and writable with
    /// one `cuMemSetAccess`. On failure, unmaps what it mapped and reports the error.
    fn map_pages(&self, base: u64, offset: u64, end: u64) -> Result<(), DeviceError> {
        let prop = self.prop();
        let g = self.granularity;
        let undo = |upto: u64| {
            for page in (offset..upto).step_by(g as usize) {
                // SAFETY: each page below `upto` was mapped by `map_page` just now.
                unsafe { sys::cuMemUnmap(base + page, g as usize) };
            }
        };
        for page in (offset..end).step_by(g as usize) {
            if let Err(e) = self.map_page(&prop, base + page) {
                undo(page);
                return Err(e);
            }
        }
        let access = sys::CUmemAccessDesc {
            location: prop.location,
            flags: sys::CUmemAccess_flags::CU_MEM_ACCESS_FLAGS_PROT_READWRITE,
        };
        let bytes = (end - offset) as usize;
        // SAFETY: [base + offset, base + end) is the run of mappings just made; `access` is one
        // valid descriptor.
        let accessible = check(
            unsafe { sys::cuMemSetAccess(base + offset, bytes, &access, 1) },
            || {
                format!(
                    "{} map: cuMemSetAccess at {:#x}+{bytes}",
                    self.name,
                    base + offset
                )
            },
        );
        if let Err(e) = accessible {
            undo(end);
            return Err(e);
        }
        Ok(())
    }

    /// Refuses a virtual-range operation on a device without virtual memory management.
    fn needs_virtual_memory(&self, what: &str) -> Result<(), DeviceError> {
        if self.virtual_memory {
            return Ok(());
        }
        Err(DeviceError::new(
            DeviceErrorKind::Unsupported,
            format!(
                "{} {what}: the device does not support virtual memory management (cuMemCreate, cuMemMap); strategies that map pages cannot run here, the others can",
                self.name
            ),
        ))
    }

    /// Frees the memory of a physical region already taken out of the table.
    fn free_region(&mut self, base: u64, region: &Region) -> Result<(), DeviceError> {
        let name = &self.name;
        match region.tier {
            // SAFETY: `base` came from cuMemAlloc_v2 and is no longer in the table.
            Tier::Gpu => check(unsafe { sys::cuMemFree_v2(base) }, || {
                format!("{name} release {base:#x} (cuMemFree)")
            }),
            // SAFETY: `base` came from cuMemAllocHost_v2 and is no longer in the table.
            Tier::PinnedHost => check(unsafe { sys::cuMemFreeHost(base as *mut c_void) }, || {
                format!("{name} release {base:#x} (cuMemFreeHost)")
            }),
            Tier::PageableHost | Tier::Disk => {
                self.pageable.remove(&base);
                Ok(())
            }
        }
    }

    /// Copies between two overlapping ranges chunk by chunk through the scratch buffer, in the
    /// direction that never overwrites source bytes not yet read.
    fn copy_overlapping(&self, src: u64, dst: u64, bytes: u64) -> Result<(), DeviceError> {
        let mut chunks: Vec<(u64, u64)> = (0..bytes)
            .step_by(SCRATCH_BYTES as usize)
            .map(|at| (at, SCRATCH_BYTES.min(bytes - at)))
            .collect();
        if dst > src {
            chunks.reverse();
        }
        for (at, n) in chunks {
            // SAFETY: both ranges were checked to be accessible device memory of this device;
            // the scratch buffer holds SCRATCH_BYTES >= n bytes and overlaps neither.
            unsafe {
                check(
                    sys::cuMemcpyDtoD_v2(self.scratch, src + at, n as usize),
                    || format!("{} copy: cuMemcpyDtoD (to scratch)", self.name),
                )?;
                check(
                    sys::cuMemcpyDtoD_v2(dst + at, self.scratch, n as usize),
                    || format!("{} copy: cuMemcpyDtoD (from scratch)", self.name),
                )?;
            }
        }
        Ok(())
    }
}

impl Device for CudaDevice {
    fn name(&self) -> String {
        self.name.clone()
    }

    fn granularity_bytes(&self) -> u64 {
        self.granularity
    }

    fn serves(&self, device: DeviceId) -> bool {
        device == DeviceId(0)
    }

    fn resident_includes(&self, tier: Tier) -> bool {
        tier == Tier::Gpu
    }

    fn reserve(&mut self, tier: Tier, bytes: u64) -> Result<u64, DeviceError> {
        self.bind()?;
        let size = usize::try_from(bytes.max(1)).map_err(|_| {
            DeviceError::new(
                DeviceErrorKind::OutOfMemory,
                format!("reserve of {bytes} bytes"),
            )
        })?;
        let base = match tier {
            Tier::Gpu => {
                let mut ptr: sys::CUdeviceptr = 0;
                // SAFETY: valid out-pointer; the allocation is owned by `regions`, freed once.
                check(unsafe { sys::cuMemAlloc_v2(&mut ptr, size) }, || {
                    format!("{} reserve of {bytes} bytes (cuMemAlloc)", self.name)
                })?;
                ptr
            }
            Tier::PinnedHost => {
                let mut host: *mut c_void = std::ptr::null_mut();
                // SAFETY: valid out-pointer; the memory is owned by `regions`, freed once.
                check(unsafe { sys::cuMemAllocHost_v2(&mut host, size) }, || {
                    format!(
                        "{} reserve of {bytes} pinned host bytes (cuMemAllocHost)",
                        self.name
                    )
                })?;
                host as u64
            }
            Tier::PageableHost => {
                let mut v = Vec::new();
                v.try_reserve_exact(size).map_err(|e| {
                    DeviceError::new(
                        DeviceErrorKind::OutOfMemory,
                        format!("{} reserve of {bytes} pageable host bytes: {e}", self.name),
                    )
                })?;
                v.resize(size, 0);
                let base = v.as_ptr() as u64;
                self.pageable.insert(base, v);
                base
            }
            Tier::Disk => {
                return Err(DeviceError::new(
                    DeviceErrorKind::Unsupported,
                    format!("{}: the disk tier is not executed on memory", self.name),
                ))
            }
        };
        self.regions.insert(base, Region::physical(tier, bytes));
        Ok(base)
    }

    fn release(&mut self, base: u64) -> Result<(), DeviceError> {
        self.bind()?;
        let region = self.regions.remove(base, false, "release")?;
        self.free_region(base, &region)
    }

    fn reserve_va(&mut self, tier: Tier, bytes: u64) -> Result<u64, DeviceError> {
        self.needs_virtual_memory("reserve_va")?;
        if tier != Tier::Gpu {
            return Err(DeviceError::new(
                DeviceErrorKind::Unsupported,
                format!(
                    "{}: virtual ranges are device memory only, not {}",
                    self.name,
                    tier.name()
                ),
            ));
        }
        self.bind()?;
        let len = bytes
            .max(1)
            .checked_next_multiple_of(self.granularity)
            .filter(|&l| usize::try_from(l).is_ok())
            .ok_or_else(|| {
                DeviceError::new(
                    DeviceErrorKind::OutOfMemory,
                    format!("{} reserve_va of {bytes} bytes: too large", self.name),
                )
            })?;
        let mut ptr: sys::CUdeviceptr = 0;
        // SAFETY: valid out-pointer; the range is owned by `regions` and freed once.
        check(
            unsafe {
                sys::cuMemAddressReserve(&mut ptr, len as usize, self.granularity as usize, 0, 0)
            },
            || {
                format!(
                    "{} reserve_va of {bytes} bytes (cuMemAddressReserve)",
                    self.name
                )
            },
        )?;
        self.regions
            .insert(ptr, Region::virtual_range(Tier::Gpu, len));
        Ok(ptr)
    }

    fn map(&mut self, base: u64, offset: u64, bytes: u64) -> Result<(), DeviceError> {
        self.needs_virtual_memory("map")?;
        self.bind()?;
        let end = self
            .regions
            .virtual_span(base, offset, bytes, self.granularity, VaOp::Map)?;
        self.map_pages(base, offset, end)?;
        self.regions
            .get_mut(base, "map")?
            .access
            .insert(offset, end);
        Ok(())
    }

    fn unmap(&mut self, base: u64, offset: u64, bytes: u64) -> Result<(), DeviceError> {
        self.bind()?;
        let end = self
            .regions
            .virtual_span(base, offset, bytes, self.granularity, VaOp::Unmap)?;
        // Synchronous copies only, but be sure no earlier work still uses these pages.
        // SAFETY: no arguments.
        check(unsafe { sys::cuCtxSynchronize() }, || {
            format!("{} unmap: cuCtxSynchronize", self.name)
        })?;
        self.unmap_pages(base, offset, end)
    }

    fn release_va(&mut self, base: u64) -> Result<(), DeviceError> {
        self.bind()?;
        let region = self.regions.get(base, "release_va")?;
        if !region.is_virtual {
            return Err(DeviceError::invalid(format!(
                "{} release_va: {base:#x} is a physical segment",
                self.name
            )));
        }
        let (len, mapped): (u64, Vec<(u64, u64)>) = (region.len, region.access.iter().collect());
        for (s, l) in mapped {
            // A page that stays mapped keeps the range in the table: nothing leaks or is lost.
            self.unmap_pages(base, s, s + l)?;
        }
        // SAFETY: the range came from cuMemAddressReserve with this length and is unmapped now.
        check(unsafe { sys::cuMemAddressFree(base, len as usize) }, || {
            format!("{} release_va {base:#x} (cuMemAddressFree)", self.name)
        })?;
        self.regions.remove(base, true, "release_va")?;
        Ok(())
    }

    fn fill(&mut self, base: u64, offset: u64, bytes: u64, seed: u64) -> Result<(), DeviceError> {
        self.bind()?;
        let (Some(dptr), tier) = self.span(base, offset, bytes, "fill")? else {
            return Ok(());
        };
        if tier.is_host() {
            // SAFETY: `span` checked that all `bytes` from `dptr` are host memory this device
            // holds; `&mut self` guarantees no other reference into them.
            let block = unsafe { std::slice::from_raw_parts_mut(dptr as *mut u8, bytes as usize) };
            pattern::fill(block, seed, 0);
            return Ok(());
        }
        let mut done = 0u64;
        while done < bytes {
            let n = (bytes - done).min(STAGING_BYTES as u64) as usize;
            let buf = &mut self.staging()[..n];
            pattern::fill(buf, seed, done);
            let src = buf.as_ptr().cast::<c_void>();
            // SAFETY: `src` holds `n` initialised bytes; [dptr + done, + n) was checked to be
            // accessible device memory of this device. The call returns once the staging
            // buffer has been read, so it may be reused.
            check(unsafe { sys::cuMemcpyHtoD_v2(dptr + done, src, n) }, || {
                format!("{} fill (cuMemcpyHtoD)", self.name)
            })?;
            done += n as u64;
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
        self.bind()?;
        let (Some(dptr), tier) = self.span(base, offset, bytes, "verify")? else {
            return Ok(Check::default());
        };
        if tier.is_host() {
            // SAFETY: as in `fill`; the slice is only read.
            let block = unsafe { std::slice::from_raw_parts(dptr as *const u8, bytes as usize) };
            return Ok(pattern::check(block, seed));
        }
        let mut result = Check::default();
        let mut done = 0u64;
        let name = self.name.clone();
        while done < bytes {
            let n = (bytes - done).min(STAGING_BYTES as u64) as usize;
            let buf = &mut self.staging()[..n];
            // SAFETY: `buf` has room for `n` bytes; [dptr + done, + n) was checked to be
            // accessible device memory. The copy is complete when the call returns.
            check(
                unsafe { sys::cuMemcpyDtoH_v2(buf.as_mut_ptr().cast(), dptr + done, n) },
                || format!("{name} verify (cuMemcpyDtoH)"),
            )?;
            let bad = pattern::count_mismatches(buf, seed, done);
            if bad > 0 && result.first_mismatch.is_none() {
                result.first_mismatch =
                    pattern::first_mismatch(buf, seed, done).map(|i| done + i as u64);
            }
            result.mismatched_bytes += bad;
            done += n as u64;
        }
        Ok(result)
    }

    fn copy(&mut self, from: (u64, u64), to: (u64, u64), bytes: u64) -> Result<(), DeviceError> {
        self.bind()?;
        let (src, src_tier) = self.span(from.0, from.1, bytes, "copy source")?;
        let (dst, dst_tier) = self.span(to.0, to.1, bytes, "copy destination")?;
        let (Some(src), Some(dst)) = (src, dst) else {
            return Ok(());
        };
        if src == dst {
            return Ok(());
        }
        let name = &self.name;
        let n = bytes as usize;
        // SAFETY (every arm): both ranges were checked to be accessible memory of this device
        // in the tiers named; each call copies exactly `n` bytes between them.
        match (src_tier.is_host(), dst_tier.is_host()) {
            (true, true) => unsafe { std::ptr::copy(src as *const u8, dst as *mut u8, n) },
            (false, false) if src < dst + bytes && dst < src + bytes => {
                self.copy_overlapping(src, dst, bytes)?
            }
            (false, false) => check(unsafe { sys::cuMemcpyDtoD_v2(dst, src, n) }, || {
                format!("{name} copy (cuMemcpyDtoD)")
            })?,
            _ if self.unified_addressing
                && (src_tier == Tier::PinnedHost || dst_tier == Tier::PinnedHost) =>
            {
                // Unified addressing: a pinned host pointer is a valid address for the copy
                // engine, which reaches it at the link's full bandwidth. (Without it, the
                // explicit HtoD/DtoH calls below take pinned memory just as well.)
                check(
                    unsafe { sys::cuMemcpyAsync(dst, src, n, std::ptr::null_mut()) },
                    || format!("{name} copy (cuMemcpyAsync)"),
                )?
            }
            (true, false) => check(
                unsafe { sys::cuMemcpyHtoD_v2(dst, src as *const c_void, n) },
                || format!("{name} copy (cuMemcpyHtoD)"),
            )?,
            (false, true) => check(
                unsafe { sys::cuMemcpyDtoH_v2(dst as *mut c_void, src, n) },
                || format!("{name} copy (cuMemcpyDtoH)"),
            )?,
        }
        // Device copies may be asynchronous: wait, so the bytes are there and the measured time
        // is the copy's.
        // SAFETY: no arguments.
        check(unsafe { sys::cuCtxSynchronize() }, || {
            format!("{} copy: cuCtxSynchronize", self.name)
        })
    }

    fn corrupt(&mut self, base: u64, offset: u64) -> Result<(), DeviceError> {
        self.bind()?;
        let (Some(dptr), tier) = self.span(base, offset, 1, "corrupt")? else {
            return Ok(());
        };
        if tier.is_host() {
            // SAFETY: `span` checked that this one byte is host memory this device holds.
            unsafe { *(dptr as *mut u8) = !*(dptr as *mut u8) };
            return Ok(());
        }
        let mut byte = 0u8;
        // SAFETY: one byte each way between a local and a checked device byte.
        unsafe {
            check(
                sys::cuMemcpyDtoH_v2((&mut byte as *mut u8).cast(), dptr, 1),
                || format!("{} corrupt (read)", self.name),
            )?;
            byte = !byte;
            check(
                sys::cuMemcpyHtoD_v2(dptr, (&byte as *const u8).cast(), 1),
                || format!("{} corrupt (write)", self.name),
            )
        }
    }

    fn available_bytes(&mut self) -> Option<u64> {
        self.bind().ok()?;
        let (mut free, mut total) = (0usize, 0usize);
        // SAFETY: valid out-pointers.
        unsafe { sys::cuMemGetInfo_v2(&mut free, &mut total) }
            .result()
            .ok()?;
        Some(free as u64)
    }

    fn resident_bytes(&mut self) -> Option<u64> {
        self.bind().ok()?;
        let (mut free, mut total) = (0usize, 0usize);
        // SAFETY: valid out-pointers.
        unsafe { sys::cuMemGetInfo_v2(&mut free, &mut total) }
            .result()
            .ok()?;
        Some(total.saturating_sub(free) as u64)
    }
}

impl Drop for CudaDevice {
    fn drop(&mut self) {
        let _ = self.bind();
        // SAFETY: no arguments; let outstanding work finish before memory goes away.
        unsafe { sys::cuCtxSynchronize() };
        for (base, region) in self.regions.take_all() {
            if region.is_virtual {
                for (s, l) in region.access.iter() {
                    let _ = self.unmap_pages(base, s, s + l);
                }
                // SAFETY: a range this device reserved with this length, now unmapped.
                unsafe { sys::cuMemAddressFree(base, region.len as usize) };
            } else {
                let _ = self.free_region(base, &region);
            }
        }
        if self.scratch != 0 {
            // SAFETY: allocated in `open`, freed once here.
            unsafe { sys::cuMemFree_v2(self.scratch) };
        }
        if let Staging::Pinned(p) = self.staging {
            // SAFETY: allocated with cuMemAllocHost_v2 in `open`, freed once here.
            unsafe { sys::cuMemFreeHost(p.cast()) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn open_without_a_driver_is_an_error_not_a_panic() {
        match CudaDevice::open(0) {
            Err(e) if !driver_present() => {
                assert_eq!(e.kind, DeviceErrorKind::NoDriver);
                assert!(e.to_string().contains("no CUDA driver"), "{e}");
                assert!(e.to_string().contains("--execute host"), "{e}");
            }
            Ok(_) => assert!(driver_present()),
            // A driver but no usable device: a clean error is all that is asked.
            Err(e) => assert_ne!(e.kind, DeviceErrorKind::NoDriver, "{e}"),
        }
    }
}
