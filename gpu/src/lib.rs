//! gpumem's device executor: carries out the decisions of `gpumem-core` policies on real
//! memory through the [`device::Device`] trait — host memory ([`host::HostDevice`]) anywhere,
//! CUDA ([`cuda::CudaDevice`]) where a driver and a GPU are present — verifies the bytes of
//! every block, measures the time of every decision, and keeps the same books and digest as
//! the simulator ([`executor::DeviceExecutor`]). It depends on `gpumem-core` only: the
//! executor contract it implements is `gpumem_core::executor::Executor`.

pub mod cuda;
pub mod device;
pub mod executor;
pub mod host;
pub mod inject;
pub mod pattern;
pub mod scaled;

pub use cuda::CudaDevice;
pub use device::{check_room, Check, Device, DeviceError, DeviceErrorKind};
pub use executor::{DeviceExecutor, ExecReport, KindTiming, Mismatch};
pub use host::HostDevice;
pub use inject::{Inject, ParseInjectError, INJECT_WINDOW};
pub use scaled::Scaled;
