//! wgpu adapters, listed with the same wgpu and graphics API cubecl uses (Vulkan on Linux), so
//! a missing driver is an error here instead of a panic on cubecl's device thread.

use burn::backend::wgpu::WgpuDevice;
use cubecl::wgpu::{AutoGraphicsApi, GraphicsApi};
use wgpu::{DeviceType, Instance, InstanceDescriptor};

use super::{DeviceInfo, WgpuPick};

/// The adapters cubecl can use, best first (discrete, integrated, virtual, CPU), each with the
/// `WgpuDevice` that selects it (cubecl counts adapters per type, in enumeration order).
pub fn adapters() -> Vec<(wgpu::AdapterInfo, WgpuDevice)> {
    let backend = AutoGraphicsApi::backend();
    let instance = Instance::new(InstanceDescriptor {
        backends: backend.into(),
        ..InstanceDescriptor::new_without_display_handle()
    });
    let infos: Vec<wgpu::AdapterInfo> = cubecl::future::block_on(instance.enumerate_adapters(backend.into()))
        .iter()
        .map(|a| a.get_info())
        .collect();
    let rank = |t: DeviceType| match t {
        DeviceType::DiscreteGpu => 0,
        DeviceType::IntegratedGpu => 1,
        DeviceType::VirtualGpu => 2,
        DeviceType::Cpu => 3,
        DeviceType::Other => 4,
    };
    let mut out: Vec<(wgpu::AdapterInfo, WgpuDevice)> = Vec::new();
    for info in infos {
        let nth = out.iter().filter(|(i, _)| i.device_type == info.device_type).count();
        let device = match info.device_type {
            DeviceType::DiscreteGpu => WgpuDevice::DiscreteGpu(nth),
            DeviceType::IntegratedGpu => WgpuDevice::IntegratedGpu(nth),
            DeviceType::VirtualGpu => WgpuDevice::VirtualGpu(nth),
            DeviceType::Cpu if nth == 0 => WgpuDevice::Cpu,
            // cubecl reaches only the first CPU adapter, and "other" ones only by accident.
            DeviceType::Cpu | DeviceType::Other => continue,
        };
        out.push((info, device));
    }
    out.sort_by_key(|(i, _)| rank(i.device_type));
    out
}

/// The adapter `pick` names, or why there is none.
pub fn probe(pick: WgpuPick, spec: &str) -> Result<(DeviceInfo, WgpuDevice), String> {
    let all = adapters();
    let listed = || {
        all.iter()
            .enumerate()
            .map(|(i, (a, _))| format!("wgpu:{i} = {} ({:?})", a.name, a.device_type))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let found = match pick {
        WgpuPick::Best | WgpuPick::Index(0) => all.first(),
        WgpuPick::Index(i) => all.get(i),
        WgpuPick::Cpu => all.iter().find(|(a, _)| a.device_type == DeviceType::Cpu),
    };
    let Some((adapter, device)) = found else {
        let backend = format!("{:?}", AutoGraphicsApi::backend());
        return Err(if all.is_empty() {
            format!(
                "wgpu: no {backend} adapter found for device `{spec}`: the {backend} loader (libvulkan.so.1) \
                 or a driver for it is missing. Install your GPU's {backend} driver (for the CPU adapter: \
                 Debian's `libvulkan1 mesa-vulkan-drivers`), or use `device: cpu`"
            )
        } else {
            format!("wgpu: no adapter `{spec}` here; the adapters are: {}", listed())
        });
    };
    let info = DeviceInfo {
        spec: spec.to_string(),
        backend: "wgpu",
        name: adapter.name.clone(),
        detail: format!(
            "{:?} {:?}, driver {} {}",
            adapter.backend, adapter.device_type, adapter.driver, adapter.driver_info
        ),
        tf32: false,
    };
    Ok((info, device.clone()))
}
