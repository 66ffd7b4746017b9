//! Adapter enumeration and choice.

use crate::{Error, Result};

/// A graphics API wgpu can run compute on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum Backend {
    /// Vulkan (Linux, Windows, Android; Mesa lavapipe on machines without a GPU).
    Vulkan,
    /// Metal (macOS, iOS).
    Metal,
    /// Direct3D 12 (Windows).
    Dx12,
    /// OpenGL / GLES.
    Gl,
}

impl Backend {
    fn bits(self) -> wgpu::Backends {
        match self {
            Backend::Vulkan => wgpu::Backends::VULKAN,
            Backend::Metal => wgpu::Backends::METAL,
            Backend::Dx12 => wgpu::Backends::DX12,
            Backend::Gl => wgpu::Backends::GL,
        }
    }
}

impl std::str::FromStr for Backend {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "vulkan" | "vk" => Ok(Backend::Vulkan),
            "metal" | "mtl" => Ok(Backend::Metal),
            "dx12" | "d3d12" => Ok(Backend::Dx12),
            "gl" | "gles" | "opengl" => Ok(Backend::Gl),
            other => Err(Error::invalid(format!(
                "unknown backend '{other}': expected one of vulkan, metal, dx12, gl"
            ))),
        }
    }
}

/// How to pick the device.
#[derive(Debug, Clone, Default)]
pub struct DeviceOptions {
    /// Only consider adapters of this backend.
    pub backend: Option<Backend>,
    /// Only consider adapters whose name contains this (case-insensitive).
    pub adapter: Option<String>,
}

impl DeviceOptions {
    /// Reads `VQCLIP_BACKEND` and `VQCLIP_ADAPTER`.
    pub fn from_env() -> Result<Self> {
        let backend = match std::env::var("VQCLIP_BACKEND") {
            Ok(s) if !s.trim().is_empty() => Some(s.parse()?),
            _ => None,
        };
        let adapter = std::env::var("VQCLIP_ADAPTER")
            .ok()
            .filter(|s| !s.trim().is_empty());
        Ok(DeviceOptions { backend, adapter })
    }
}

/// What `vqclip info` prints about one adapter.
#[derive(Debug, Clone, serde::Serialize)]
pub struct AdapterSummary {
    /// Adapter name.
    pub name: String,
    /// Backend, e.g. "Vulkan".
    pub backend: String,
    /// "DiscreteGpu", "IntegratedGpu", "VirtualGpu", "Cpu" or "Other".
    pub device_type: String,
    /// Driver name.
    pub driver: String,
    /// Driver version / details.
    pub driver_info: String,
}

impl From<&wgpu::AdapterInfo> for AdapterSummary {
    fn from(i: &wgpu::AdapterInfo) -> Self {
        AdapterSummary {
            name: i.name.clone(),
            backend: format!("{:?}", i.backend),
            device_type: format!("{:?}", i.device_type),
            driver: i.driver.clone(),
            driver_info: i.driver_info.clone(),
        }
    }
}

fn instance() -> wgpu::Instance {
    wgpu::Instance::new(wgpu::InstanceDescriptor::new_without_display_handle_from_env())
}

fn all_adapters(backends: wgpu::Backends) -> Vec<wgpu::Adapter> {
    pollster::block_on(instance().enumerate_adapters(backends))
}

/// Every adapter wgpu can see on this machine.
pub fn list_adapters() -> Vec<AdapterSummary> {
    all_adapters(wgpu::Backends::all())
        .iter()
        .map(|a| AdapterSummary::from(&a.get_info()))
        .collect()
}

fn rank(t: wgpu::DeviceType) -> u8 {
    match t {
        wgpu::DeviceType::DiscreteGpu => 0,
        wgpu::DeviceType::IntegratedGpu => 1,
        wgpu::DeviceType::VirtualGpu => 2,
        wgpu::DeviceType::Cpu => 3,
        wgpu::DeviceType::Other => 4,
    }
}

fn backend_rank(b: wgpu::Backend) -> u8 {
    // Prefer the native compute APIs over GL when one device shows up under several.
    match b {
        wgpu::Backend::Vulkan | wgpu::Backend::Metal | wgpu::Backend::Dx12 => 0,
        _ => 1,
    }
}

pub(crate) fn choose(opts: &DeviceOptions) -> Result<wgpu::Adapter> {
    let backends = opts.backend.map_or(wgpu::Backends::all(), Backend::bits);
    let mut adapters = all_adapters(backends);
    if adapters.is_empty() {
        let which = opts
            .backend
            .map_or("any backend".to_string(), |b| format!("backend {b:?}"));
        return Err(Error::NoAdapter(format!(
            "no GPU adapter found for {which}. Install your GPU's driver, or on Debian/Ubuntu \
             install Mesa's CPU Vulkan driver with `sudo apt-get install mesa-vulkan-drivers` \
             (or run scripts/setup.sh)"
        )));
    }
    if let Some(want) = &opts.adapter {
        let w = want.to_lowercase();
        let seen: Vec<String> = adapters
            .iter()
            .map(|a| {
                let i = a.get_info();
                format!("'{}' ({:?})", i.name, i.backend)
            })
            .collect();
        adapters.retain(|a| a.get_info().name.to_lowercase().contains(&w));
        if adapters.is_empty() {
            return Err(Error::NoAdapter(format!(
                "no adapter name contains '{want}'; adapters seen: {}",
                seen.join(", ")
            )));
        }
    }
    adapters.sort_by_key(|a| {
        let i = a.get_info();
        (rank(i.device_type), backend_rank(i.backend))
    });
    Ok(adapters.remove(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backend_names_parse_and_unknown_is_an_error() {
        assert_eq!("Vulkan".parse::<Backend>().unwrap(), Backend::Vulkan);
        assert_eq!("dx12".parse::<Backend>().unwrap(), Backend::Dx12);
        let e = "cuda".parse::<Backend>().unwrap_err().to_string();
        assert!(e.contains("unknown backend 'cuda'"), "{e}");
    }

    #[test]
    fn adapter_that_matches_nothing_is_an_error() {
        let opts = DeviceOptions {
            backend: None,
            adapter: Some("no-such-adapter-xyz".into()),
        };
        let e = choose(&opts).unwrap_err().to_string();
        assert!(
            e.contains("no-such-adapter-xyz") || e.contains("no GPU adapter"),
            "{e}"
        );
    }
}
