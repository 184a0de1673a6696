//! The CUDA driver, probed through its C API before cudarc touches it: cudarc panics when
//! `libcuda` is missing, and cubecl unwraps every driver error on its device thread. The probe
//! loads the library itself and turns each way a machine can lack CUDA into a sentence.

use std::ffi::{c_char, c_int, c_uint, CStr};
use std::path::PathBuf;

use super::DeviceInfo;

/// The CUDA version this binary's cudarc was built for (`CUDARC_CUDA_VERSION`, e.g. `13000`),
/// when the build said so.
const BUILT_FOR: Option<&str> = option_env!("CUDARC_CUDA_VERSION");

type FnInit = unsafe extern "C" fn(c_uint) -> c_int;
type FnOutInt = unsafe extern "C" fn(*mut c_int) -> c_int;
type FnDeviceGet = unsafe extern "C" fn(*mut c_int, c_int) -> c_int;
type FnDeviceName = unsafe extern "C" fn(*mut c_char, c_int, c_int) -> c_int;
type FnDeviceAttr = unsafe extern "C" fn(*mut c_int, c_int, c_int) -> c_int;

const ATTR_CC_MAJOR: c_int = 75;
const ATTR_CC_MINOR: c_int = 76;

/// The driver's device `index`, or what is missing.
pub fn probe(index: usize, spec: &str) -> Result<DeviceInfo, String> {
    let lib = ["libcuda.so.1", "libcuda.so"]
        .iter()
        // SAFETY: loading the NVIDIA driver library runs its initializers, which is what cudarc
        // does too; nothing else is loaded under these names.
        .find_map(|name| unsafe { libloading::Library::new(*name) }.ok())
        .ok_or_else(|| {
            "CUDA: no NVIDIA driver on this machine (libcuda.so.1 cannot be loaded). Install the NVIDIA \
             driver, or check that LD_LIBRARY_PATH reaches libcuda.so.1 (in a container: run it with the \
             GPU exposed, e.g. `docker run --gpus all`), or use `device: cpu`"
                .to_string()
        })?;
    // Never unloaded: cudarc loads the same library later and the driver dislikes dlclose.
    let lib: &'static libloading::Library = Box::leak(Box::new(lib));
    let sym = |name: &str| -> Result<*const (), String> {
        // SAFETY: the symbol is only read as an address here; each is cast below to the signature
        // of the CUDA driver API documents for it.
        unsafe { lib.get::<*const ()>(name.as_bytes()) }.map(|s| *s).map_err(|e| {
            format!("CUDA: the driver library lacks `{name}` ({e}); the driver is too old or broken")
        })
    };
    // SAFETY: these symbols are the CUDA driver API's, with the C signatures declared above.
    let (init, version, count, get, name, attr) = unsafe {
        (
            std::mem::transmute::<*const (), FnInit>(sym("cuInit")?),
            std::mem::transmute::<*const (), FnOutInt>(sym("cuDriverGetVersion")?),
            std::mem::transmute::<*const (), FnOutInt>(sym("cuDeviceGetCount")?),
            std::mem::transmute::<*const (), FnDeviceGet>(sym("cuDeviceGet")?),
            std::mem::transmute::<*const (), FnDeviceName>(sym("cuDeviceGetName")?),
            std::mem::transmute::<*const (), FnDeviceAttr>(sym("cuDeviceGetAttribute")?),
        )
    };
    let mut driver: c_int = 0;
    // SAFETY: an out-pointer to a live c_int; cuDriverGetVersion may be called before cuInit.
    check("cuDriverGetVersion", unsafe { version(&mut driver) })?;
    // SAFETY: cuInit takes flags only (0 is the one defined value).
    check("cuInit", unsafe { init(0) })?;
    let mut n: c_int = 0;
    // SAFETY: an out-pointer to a live c_int, after cuInit.
    check("cuDeviceGetCount", unsafe { count(&mut n) })?;
    let n = usize::try_from(n).unwrap_or(0);
    if index >= n {
        return Err(format!(
            "CUDA: device {index} asked for (`{spec}`), but the driver sees {n} device{} (indices start at 0; \
             CUDA_VISIBLE_DEVICES may hide some)",
            if n == 1 { "" } else { "s" }
        ));
    }
    let mut dev: c_int = 0;
    let ordinal = c_int::try_from(index).map_err(|_| format!("CUDA: device index {index} is too large"))?;
    // SAFETY: an out-pointer to a live c_int and an ordinal below the device count.
    check("cuDeviceGet", unsafe { get(&mut dev, ordinal) })?;
    let mut buf = [0 as c_char; 256];
    // SAFETY: the buffer holds 256 bytes and the driver writes at most `len` bytes, NUL included.
    check("cuDeviceGetName", unsafe { name(buf.as_mut_ptr(), 256, dev) })?;
    // SAFETY: the driver wrote a NUL-terminated string into `buf` (zeroed beforehand, so a NUL exists).
    let gpu = unsafe { CStr::from_ptr(buf.as_ptr()) }.to_string_lossy().into_owned();
    let (mut major, mut minor) = (0, 0);
    // SAFETY: out-pointers to live c_ints, documented attribute ids, a valid device handle.
    unsafe {
        check("cuDeviceGetAttribute", attr(&mut major, ATTR_CC_MAJOR, dev))?;
        check("cuDeviceGetAttribute", attr(&mut minor, ATTR_CC_MINOR, dev))?;
    }
    if let Some(built) = BUILT_FOR.and_then(|b| b.parse::<c_int>().ok()) {
        // Driver API versions are 1000 * major + 10 * minor; cudarc's are major * 1000 + minor * 10 too.
        if built > driver {
            return Err(format!(
                "CUDA: the driver supports CUDA {} but this binary was built for CUDA {}: rebuild it with \
                 `CUDARC_CUDA_VERSION={driver} cargo build --release --features cuda`, or update the driver",
                version_text(driver),
                version_text(built)
            ));
        }
    }
    // NVRTC compiles every kernel against the toolkit's headers (cubecl panics without them).
    let headers = cubecl::cuda::install::cuda_path().map(|p| p.join("include").join("cuda_runtime.h"));
    if !headers.as_ref().is_some_and(|h| h.exists()) {
        return Err(format!(
            "CUDA: the driver sees {gpu}, but the CUDA toolkit's headers are missing ({}): cubecl compiles its \
             kernels at run time with NVRTC and needs them. Install the CUDA toolkit (or its `cuda-cudart-dev` \
             and `cuda-nvrtc` packages) and set CUDA_PATH to it",
            headers.unwrap_or_else(|| PathBuf::from("no CUDA_PATH, /usr/local/cuda or /opt/cuda")).display()
        ));
    }
    Ok(DeviceInfo {
        spec: spec.to_string(),
        backend: "cuda",
        name: gpu,
        detail: format!(
            "compute capability {major}.{minor}, driver CUDA {}, built for CUDA {}",
            version_text(driver),
            BUILT_FOR.map_or("(nvcc's or cudarc's newest)".to_string(), |b| b
                .parse()
                .map_or(b.to_string(), version_text))
        ),
        tf32: true,
    })
}

fn version_text(v: c_int) -> String {
    format!("{}.{}", v / 1000, (v % 1000) / 10)
}

/// A driver API result as an error sentence.
fn check(call: &str, code: c_int) -> Result<(), String> {
    let why = match code {
        0 => return Ok(()),
        34 => "the toolkit's stub libcuda.so was loaded instead of the driver (no real NVIDIA driver here)",
        100 => "the driver is installed but sees no CUDA device",
        46 => "the device is busy or unavailable (exclusive-process mode?)",
        803 => "the kernel module and libcuda versions differ (reboot or reinstall the driver)",
        804 => "this driver's forward-compatibility mode does not support this GPU",
        999 => "unknown error",
        _ => "driver error",
    };
    Err(format!("CUDA: {call} failed with error {code}: {why}"))
}
