//! Where the model runs. `device:` is parsed here, the device is probed before burn touches it
//! (burn panics on a missing driver or adapter, on a thread of its own, with a message that
//! says nothing useful), and [`with_backend`] is the one place that turns a device into a burn
//! backend: the trainer, the evaluation stages and the selftest all go through it.

#[cfg(feature = "cuda")]
mod cuda;
#[cfg(feature = "wgpu")]
mod wgpu;

use std::fmt;
use std::panic::{catch_unwind, AssertUnwindSafe};

use burn::tensor::backend::AutodiffBackend;

/// Which wgpu adapter (`wgpu`, `wgpu:N`, `wgpu:cpu`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WgpuPick {
    /// The best adapter: a discrete GPU before an integrated, a virtual and a CPU one.
    Best,
    /// The N-th adapter in that order (`simclr selftest --device wgpu` lists them).
    Index(usize),
    /// The first CPU adapter (mesa's lavapipe): the GPU code path on a CPU, for tests.
    Cpu,
}

/// Where the model runs: `cpu`, `cuda[:N]` or `wgpu[:N | :cpu]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceSpec {
    Cpu,
    Cuda(usize),
    Wgpu(WgpuPick),
}

/// The accepted spellings, for error hints.
pub const DEVICE_HINT: &str = "use `cpu`, `cuda`, `cuda:N`, `wgpu`, `wgpu:N` or `wgpu:cpu`";

impl DeviceSpec {
    pub fn parse(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let index = |rest: &str| rest.parse::<usize>().map_err(|_| format!("unknown device `{s}`"));
        match s {
            "cpu" => Ok(DeviceSpec::Cpu),
            "cuda" | "gpu" => Ok(DeviceSpec::Cuda(0)),
            "wgpu" => Ok(DeviceSpec::Wgpu(WgpuPick::Best)),
            "wgpu:cpu" => Ok(DeviceSpec::Wgpu(WgpuPick::Cpu)),
            _ => {
                if let Some(rest) = s.strip_prefix("cuda:") {
                    index(rest).map(DeviceSpec::Cuda)
                } else if let Some(rest) = s.strip_prefix("wgpu:") {
                    index(rest).map(|i| DeviceSpec::Wgpu(WgpuPick::Index(i)))
                } else {
                    Err(format!("unknown device `{s}`"))
                }
            }
        }
    }

    /// `Err` with a rebuild hint when this binary lacks the device's backend.
    pub fn check_built(self) -> Result<(), String> {
        match self {
            DeviceSpec::Cpu => Ok(()),
            DeviceSpec::Cuda(_) if cfg!(feature = "cuda") => Ok(()),
            DeviceSpec::Wgpu(_) if cfg!(feature = "wgpu") => Ok(()),
            DeviceSpec::Cuda(_) => Err(missing_backend("CUDA", "cuda")),
            DeviceSpec::Wgpu(_) => Err(missing_backend("wgpu", "wgpu")),
        }
    }
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceSpec::Cpu => f.write_str("cpu"),
            DeviceSpec::Cuda(i) => write!(f, "cuda:{i}"),
            DeviceSpec::Wgpu(WgpuPick::Best) => f.write_str("wgpu"),
            DeviceSpec::Wgpu(WgpuPick::Index(i)) => write!(f, "wgpu:{i}"),
            DeviceSpec::Wgpu(WgpuPick::Cpu) => f.write_str("wgpu:cpu"),
        }
    }
}

fn missing_backend(name: &str, feature: &str) -> String {
    format!(
        "this build of simclr has no {name} backend: rebuild with the `{feature}` feature \
         (`cargo build --release --features {feature}`)"
    )
}

/// The device found by the probe, in words.
#[derive(Clone, Debug, PartialEq)]
pub struct DeviceInfo {
    /// The device as asked for (`cuda:0`, `wgpu`).
    pub spec: String,
    /// burn's backend: `flex` (CPU), `cuda` or `wgpu`.
    pub backend: &'static str,
    /// The device's own name (the GPU's, or the adapter's).
    pub name: String,
    /// Driver and version details.
    pub detail: String,
    /// Whether f32 matrix products run in TF32 (CUDA: cubecl uses tensor cores), which sets the
    /// tolerance of a comparison with the CPU.
    pub tf32: bool,
}

/// Work to run on the backend of a device, whatever it is (a generic closure).
pub trait OnBackend {
    type Output;
    fn run<B: AutodiffBackend>(self, device: B::Device, info: &DeviceInfo) -> Self::Output;
}

/// Probes `spec` and runs `work` on its backend. A device that is missing or unusable is an
/// `Err` naming it and what is missing; a panic inside burn while setting it up becomes an `Err`
/// too (a later panic, in a step, is the caller's to catch).
pub fn with_backend<W: OnBackend>(spec: DeviceSpec, work: W) -> Result<W::Output, String> {
    spec.check_built()?;
    match spec {
        DeviceSpec::Cpu => {
            let info = DeviceInfo {
                spec: spec.to_string(),
                backend: "flex",
                name: "cpu".into(),
                detail: format!("{} threads", rayon::current_num_threads()),
                tf32: false,
            };
            guarded(&info, || {
                work.run::<burn::backend::Autodiff<burn::backend::Flex>>(Default::default(), &info)
            })
        }
        #[cfg(feature = "cuda")]
        DeviceSpec::Cuda(index) => {
            let info = cuda::probe(index, &spec.to_string())?;
            let device = burn::backend::cuda::CudaDevice::new(index);
            guarded(&info, || work.run::<burn::backend::Autodiff<burn::backend::Cuda>>(device, &info))
        }
        #[cfg(feature = "wgpu")]
        DeviceSpec::Wgpu(pick) => {
            let (info, device) = wgpu::probe(pick, &spec.to_string())?;
            guarded(&info, || work.run::<burn::backend::Autodiff<burn::backend::Wgpu>>(device, &info))
        }
        #[allow(unreachable_patterns)]
        _ => Err(spec.check_built().err().unwrap_or_default()),
    }
}

fn guarded<T>(info: &DeviceInfo, f: impl FnOnce() -> T) -> Result<T, String> {
    catch_unwind(AssertUnwindSafe(f)).map_err(|p| {
        format!("cannot use {} device {} ({}): {}", info.backend, info.spec, info.name, panic_message(p))
    })
}

/// The text of a caught panic.
pub fn panic_message(p: Box<dyn std::any::Any + Send>) -> String {
    p.downcast_ref::<String>()
        .cloned()
        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "unknown panic".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_parse_and_print_back() {
        for (text, spec) in [
            ("cpu", DeviceSpec::Cpu),
            ("cuda:3", DeviceSpec::Cuda(3)),
            ("wgpu", DeviceSpec::Wgpu(WgpuPick::Best)),
            ("wgpu:1", DeviceSpec::Wgpu(WgpuPick::Index(1))),
            ("wgpu:cpu", DeviceSpec::Wgpu(WgpuPick::Cpu)),
        ] {
            assert_eq!(DeviceSpec::parse(text), Ok(spec));
            assert_eq!(spec.to_string(), text);
        }
        assert_eq!(DeviceSpec::parse(" cuda "), Ok(DeviceSpec::Cuda(0)));
        for bad in ["tpu", "cuda:x", "wgpu:", "wgpu:-1", "cuda:1:2"] {
            assert!(DeviceSpec::parse(bad).unwrap_err().contains(bad), "{bad}");
        }
    }

    #[test]
    fn a_backend_left_out_of_the_build_names_its_feature() {
        let cuda = DeviceSpec::Cuda(0).check_built();
        assert_eq!(cuda.is_ok(), cfg!(feature = "cuda"));
        if let Err(e) = cuda {
            assert!(e.contains("CUDA") && e.contains("--features cuda"), "{e}");
        }
        let wgpu = DeviceSpec::Wgpu(WgpuPick::Best).check_built();
        assert_eq!(wgpu.is_ok(), cfg!(feature = "wgpu"));
        if !cfg!(feature = "wgpu") {
            let e = with_backend(DeviceSpec::Wgpu(WgpuPick::Best), Nothing).unwrap_err();
            assert!(e.contains("wgpu") && e.contains("--features wgpu"), "{e}");
        }
    }

    #[test]
    fn the_cpu_runs_work_generically() {
        let info = with_backend(DeviceSpec::Cpu, Nothing).unwrap();
        assert_eq!((info.backend, info.spec.as_str()), ("flex", "cpu"));
    }

    struct Nothing;
    impl OnBackend for Nothing {
        type Output = DeviceInfo;
        fn run<B: AutodiffBackend>(self, _: B::Device, info: &DeviceInfo) -> DeviceInfo {
            info.clone()
        }
    }
}
