//! Compute backends: which ones this build has, and how to open a device on one.
//!
//! burn 0.22 picks its backend at run time from the [`Device`]; the cargo features of this crate
//! (`cuda`, `rocm`, `wgpu`, `vulkan`, `metal`) decide which backends exist in the binary. The
//! pure-Rust CPU backend `flex` is always compiled in.

use std::fmt;
use std::str::FromStr;

/// What [`Backend::device`] opens: burn's run-time device handle, re-exported so that roles
/// holding one need not depend on burn themselves.
pub use burn::tensor::Device;

/// A compute backend that a worker (or any other role) can train and infer on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Backend {
    /// burn's pure-Rust CPU backend (SIMD and threads). Always available.
    Flex,
    /// NVIDIA GPUs through CUDA (feature `cuda`).
    Cuda,
    /// AMD GPUs through ROCm/HIP (feature `rocm`).
    Rocm,
    /// Any GPU through wgpu, on whichever graphics API the platform offers (feature `wgpu`).
    Wgpu,
    /// wgpu pinned to Vulkan (feature `vulkan`).
    Vulkan,
    /// wgpu pinned to Metal with native MSL (feature `metal`).
    Metal,
}

/// Error returned when a backend name is unknown or not compiled into this build.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BackendError {
    /// The name is not one Amity knows.
    #[error(
        "unknown backend `{name}`; backends compiled into this build: {}",
        list(Backend::compiled())
    )]
    Unknown {
        /// The name that was asked for.
        name: String,
    },
    /// The backend exists but this binary was built without its cargo feature.
    #[error(
        "backend `{backend}` is not compiled into this build (rebuild with `--features {backend}`); \
         backends compiled in: {}",
        list(Backend::compiled())
    )]
    NotCompiled {
        /// The backend that was asked for.
        backend: Backend,
    },
    /// The backend is compiled in, but its device does not compute (no driver or adapter).
    #[error(
        "backend `{backend}` is compiled in but device {index} does not work (is its driver \
         installed? `flex` always works): {reason}"
    )]
    Unavailable {
        /// The backend that was asked for.
        backend: Backend,
        /// The device index.
        index: usize,
        /// What the backend said when probed.
        reason: String,
    },
}

fn list(backends: Vec<Backend>) -> String {
    backends
        .iter()
        .map(|b| b.name())
        .collect::<Vec<_>>()
        .join(", ")
}

impl Backend {
    /// Every backend Amity knows, compiled in or not.
    pub const ALL: [Backend; 6] = [
        Backend::Flex,
        Backend::Cuda,
        Backend::Rocm,
        Backend::Wgpu,
        Backend::Vulkan,
        Backend::Metal,
    ];

    /// The name used on the command line and in configs.
    pub fn name(self) -> &'static str {
        match self {
            Backend::Flex => "flex",
            Backend::Cuda => "cuda",
            Backend::Rocm => "rocm",
            Backend::Wgpu => "wgpu",
            Backend::Vulkan => "vulkan",
            Backend::Metal => "metal",
        }
    }

    /// Whether this binary was built with this backend.
    pub fn is_compiled(self) -> bool {
        match self {
            Backend::Flex => true,
            Backend::Cuda => cfg!(feature = "cuda"),
            Backend::Rocm => cfg!(feature = "rocm"),
            Backend::Wgpu => cfg!(feature = "wgpu"),
            Backend::Vulkan => cfg!(feature = "vulkan"),
            Backend::Metal => cfg!(feature = "metal"),
        }
    }

    /// The backends compiled into this binary, CPU first.
    pub fn compiled() -> Vec<Backend> {
        Backend::ALL
            .into_iter()
            .filter(|b| b.is_compiled())
            .collect()
    }

    /// Parses a backend name and checks that it is compiled in.
    pub fn parse_available(name: &str) -> Result<Backend, BackendError> {
        let backend: Backend = name.parse()?;
        if backend.is_compiled() {
            Ok(backend)
        } else {
            Err(BackendError::NotCompiled { backend })
        }
    }

    /// Opens the device with the given index on this backend (index ignored by `flex` and the
    /// wgpu family, which pick the default adapter and refuse a software one), and checks that
    /// it computes.
    ///
    /// burn creates a GPU device lazily and, when there is no driver or adapter, panics at the
    /// first tensor operation (a dropped channel inside CubeCL). A GPU device is therefore
    /// probed here with one small sum, and a failure becomes [`BackendError::Unavailable`]
    /// carrying what the backend said.
    pub fn device(self, index: usize) -> Result<Device, BackendError> {
        let device = self.open(index)?;
        if self != Backend::Flex {
            probe(&device).map_err(|reason| BackendError::Unavailable {
                backend: self,
                index,
                reason,
            })?;
        }
        Ok(device)
    }

    fn open(self, index: usize) -> Result<Device, BackendError> {
        let _ = index;
        match self {
            Backend::Flex => Ok(Device::flex()),
            #[cfg(feature = "cuda")]
            Backend::Cuda => Ok(Device::cuda(index)),
            #[cfg(feature = "rocm")]
            Backend::Rocm => Ok(Device::rocm(index)),
            #[cfg(feature = "wgpu")]
            Backend::Wgpu => wgpu_family::open(self, index, burn::tensor::wgpu::WgpuBackend::Auto),
            #[cfg(feature = "vulkan")]
            Backend::Vulkan => {
                wgpu_family::open(self, index, burn::tensor::wgpu::WgpuBackend::Vulkan)
            }
            #[cfg(feature = "metal")]
            Backend::Metal => {
                wgpu_family::open(self, index, burn::tensor::wgpu::WgpuBackend::Metal)
            }
            #[allow(unreachable_patterns)]
            other => Err(BackendError::NotCompiled { backend: other }),
        }
    }
}

/// Name of the environment variable that lets the wgpu family run on a software (CPU) adapter.
pub const ALLOW_SOFTWARE_ADAPTER: &str = "AMITY_ALLOW_SOFTWARE_ADAPTER";

/// Opening a device of the wgpu family (`wgpu`, `vulkan`, `metal`).
///
/// wgpu's default adapter selection falls back to a software rasteriser (Mesa's `llvmpipe`,
/// which graphics and FFmpeg packages bring along) on a machine without a GPU. Training there
/// runs, but slower than `flex` by orders of magnitude: a user who asked for a GPU would wait
/// without knowing why. So the runtime is initialised explicitly here, the adapter it picked is
/// inspected, and a CPU adapter is refused unless [`ALLOW_SOFTWARE_ADAPTER`] is set.
#[cfg(any(feature = "wgpu", feature = "vulkan", feature = "metal"))]
mod wgpu_family {
    use std::collections::HashMap;
    use std::sync::{Mutex, OnceLock};

    use burn::tensor::wgpu::{WgpuBackend, WgpuInitError, wgpu};
    use burn::tensor::{Device, DeviceKind};

    use super::{ALLOW_SOFTWARE_ADAPTER, Backend, BackendError};

    /// What the first opening of each backend found: a runtime can be initialised once per
    /// process, so later openings reuse the verdict (and the registered runtime).
    fn verdicts() -> &'static Mutex<HashMap<Backend, Result<(), String>>> {
        static VERDICTS: OnceLock<Mutex<HashMap<Backend, Result<(), String>>>> = OnceLock::new();
        VERDICTS.get_or_init(|| Mutex::new(HashMap::new()))
    }

    /// The lazily created device of `backend` on the default adapter.
    fn plain(api: WgpuBackend) -> Device {
        match api {
            #[cfg(feature = "vulkan")]
            WgpuBackend::Vulkan => Device::vulkan(DeviceKind::DefaultDevice),
            #[cfg(feature = "metal")]
            WgpuBackend::Metal => Device::metal(DeviceKind::DefaultDevice),
            _ => Device::wgpu(DeviceKind::DefaultDevice),
        }
    }

    pub(super) fn open(
        backend: Backend,
        index: usize,
        api: WgpuBackend,
    ) -> Result<Device, BackendError> {
        let unavailable = |reason: String| BackendError::Unavailable {
            backend,
            index,
            reason,
        };
        let mut verdicts = verdicts()
            .lock()
            .map_err(|_| unavailable("an earlier opening panicked".to_owned()))?;
        if let Some(verdict) = verdicts.get(&backend) {
            return verdict.clone().map(|()| plain(api)).map_err(unavailable);
        }
        let allow_software = std::env::var_os(ALLOW_SOFTWARE_ADAPTER).is_some();
        let (verdict, device) = match Device::wgpu_options()
            .device_kind(DeviceKind::DefaultDevice)
            .graphics_api(api)
            .init_with_setup()
        {
            Ok((device, setup)) => {
                let info = setup.adapter.get_info();
                if info.device_type == wgpu::DeviceType::Cpu && !allow_software {
                    let driver = match info.driver.as_str() {
                        "" => String::new(),
                        d => format!(" (driver {d})"),
                    };
                    let reason = format!(
                        "wgpu found no GPU adapter, only `{}`{driver}, a software rasteriser \
                         on the CPU that trains far slower than `flex`; set \
                         {ALLOW_SOFTWARE_ADAPTER}=1 to use it anyway",
                        info.name
                    );
                    (Err(reason), None)
                } else {
                    (Ok(()), Some(device))
                }
            }
            // Initialised already (by a tensor operation elsewhere in the process): use it.
            Err(WgpuInitError::Registration { .. }) => (Ok(()), None),
            Err(e) => (Err(e.to_string()), None),
        };
        verdicts.insert(backend, verdict.clone());
        verdict
            .map(|()| device.unwrap_or_else(|| plain(api)))
            .map_err(unavailable)
    }
}

/// Runs one sum on `device`; a panic inside the backend (no driver, no adapter) becomes its
/// messages. The process's panic hook is swapped for one that records instead of printing while
/// the probe runs, so the user sees one clear error rather than a backtrace.
fn probe(device: &Device) -> Result<(), String> {
    use std::panic::{AssertUnwindSafe, catch_unwind, set_hook, take_hook};
    use std::sync::{Arc, Mutex};

    let said = Arc::new(Mutex::new(Vec::<String>::new()));
    let record = Arc::clone(&said);
    let previous = take_hook();
    set_hook(Box::new(move |info| {
        if let Ok(mut said) = record.lock() {
            said.push(info.to_string());
        }
    }));
    let result = catch_unwind(AssertUnwindSafe(|| {
        let t = burn::tensor::Tensor::<1>::from_floats([1.0, 2.0], device);
        t.sum().into_scalar::<f32>()
    }));
    set_hook(previous);
    let said = said.lock().map(|s| s.join("; ")).unwrap_or_default();
    match result {
        Ok(3.0) => Ok(()),
        Ok(sum) => Err(format!("a probe sum of 1 and 2 returned {sum}")),
        Err(_) => Err(if said.is_empty() {
            "it panicked at its first operation".to_owned()
        } else {
            said
        }),
    }
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Backend {
    type Err = BackendError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Backend::ALL
            .into_iter()
            .find(|b| b.name().eq_ignore_ascii_case(s))
            .ok_or_else(|| BackendError::Unknown { name: s.to_owned() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for b in Backend::ALL {
            assert_eq!(b.name().parse::<Backend>(), Ok(b));
        }
    }

    #[test]
    fn flex_is_always_compiled_and_listed_first() {
        assert_eq!(Backend::compiled()[0], Backend::Flex);
        assert!(Backend::parse_available("flex").is_ok());
    }

    #[test]
    fn unknown_backend_error_lists_what_is_compiled() {
        let err = Backend::parse_available("tpu").unwrap_err();
        assert!(err.to_string().contains("unknown backend `tpu`"));
        assert!(err.to_string().contains("flex"));
    }

    #[test]
    fn a_working_device_passes_the_probe() {
        assert_eq!(probe(&Device::flex()), Ok(()));
    }

    #[test]
    fn unavailable_device_error_names_the_backend_and_the_way_out() {
        let err = BackendError::Unavailable {
            backend: Backend::Vulkan,
            index: 0,
            reason: "no adapter found on the requested graphics API".into(),
        };
        let msg = err.to_string();
        assert!(msg.contains("backend `vulkan`"), "{msg}");
        assert!(msg.contains("no adapter found"), "{msg}");
        assert!(msg.contains("`flex` always works"), "{msg}");
    }

    /// Runs only in a build with the `wgpu` feature (by hand: `cargo test -p amity-shared
    /// --features wgpu wgpu_`): whatever the machine offers, opening twice gives the same
    /// verdict (the runtime initialises once per process), and a device that opens computes.
    #[cfg(feature = "wgpu")]
    #[test]
    fn wgpu_opening_twice_gives_the_same_verdict() {
        let first = Backend::Wgpu.device(0);
        let second = Backend::Wgpu.device(0);
        match (&first, &second) {
            (Ok(a), Ok(b)) => {
                for d in [a, b] {
                    let t = burn::tensor::Tensor::<1>::from_floats([1.0, 2.0], d);
                    assert_eq!(t.sum().into_scalar::<f32>(), 3.0);
                }
            }
            (Err(a), Err(b)) => {
                assert_eq!(a, b);
                let msg = a.to_string();
                assert!(msg.contains("backend `wgpu`"), "{msg}");
                if msg.contains("software rasteriser") {
                    assert!(msg.contains(ALLOW_SOFTWARE_ADAPTER), "{msg}");
                }
            }
            _ => panic!("two openings disagree: {first:?} then {second:?}"),
        }
    }

    #[test]
    fn flex_device_runs_an_operation() {
        let device = Backend::Flex.device(0).expect("flex is always compiled");
        let t = burn::tensor::Tensor::<1>::from_floats([1.0, 2.0, 3.0], &device);
        let sum: f32 = t.sum().into_scalar();
        assert_eq!(sum, 6.0);
    }
}
