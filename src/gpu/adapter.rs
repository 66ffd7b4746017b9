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
    /// Most bytes the buffer pool may hold (live and idle buffers together); `None` takes
    /// [`default_memory_budget`]. An allocation past it fails with an error that names the
    /// budget, instead of the driver failing (or swapping) later.
    pub max_memory: Option<u64>,
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
        Ok(DeviceOptions {
            backend,
            adapter,
            max_memory: None,
        })
    }
}

/// The memory budget used when [`DeviceOptions::max_memory`] is not given: on a CPU adapter
/// (lavapipe, SwiftShader) "GPU" memory is system memory, so three quarters of the machine's
/// physical memory (`MemTotal` of /proc/meminfo; none where that cannot be read). wgpu does
/// not report a GPU's own memory size, so GPUs get no budget by default and their driver's
/// out-of-memory error (turned into an [`Error::Gpu`]) is the limit.
pub fn default_memory_budget(info: &wgpu::AdapterInfo) -> Option<u64> {
    if info.device_type != wgpu::DeviceType::Cpu {
        return None;
    }
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kib: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kib.checked_mul(1024)? / 4 * 3)
}

/// Gives the driver the environment it expects before any device is opened: Mesa's Vulkan
/// drivers (through libwayland) print `error: XDG_RUNTIME_DIR is invalid or not set` when
/// the variable is unset or not an absolute path to a folder, which reads as a failure on
/// every run. In that case this sets it, for this process only, to a private folder
/// (`<temp dir>/vqclip-runtime-<uid>`, mode 0700, created if needed, used only if it is ours).
///
/// It changes the process environment, so call it first thing in `main`, before any thread
/// starts (another thread reading the environment while it is written is a data race in
/// the C library). Does nothing on other systems or when the folder cannot be made private.
pub fn prepare_driver_environment() {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        if !needs_runtime_dir(std::env::var_os("XDG_RUNTIME_DIR").as_deref()) {
            return;
        }
        // The effective uid, as the owner of what this process creates.
        let Ok(uid) = std::fs::metadata("/proc/self").map(|m| m.uid()) else {
            return;
        };
        if let Some(dir) = private_dir(&std::env::temp_dir(), uid) {
            std::env::set_var("XDG_RUNTIME_DIR", dir);
        }
    }
}

/// Whether `XDG_RUNTIME_DIR` (its value, if set) is one libwayland complains about: unset,
/// not an absolute path, or not an existing folder.
#[cfg(unix)]
fn needs_runtime_dir(value: Option<&std::ffi::OsStr>) -> bool {
    !value.is_some_and(|d| {
        let p = std::path::Path::new(d);
        p.is_absolute() && p.is_dir()
    })
}

/// `<base>/vqclip-runtime-<uid>`, created with mode 0700 if missing; `None` unless it ends
/// up a real folder owned by `uid` with mode 0700. A folder of someone else's in a shared
/// temp dir (or a link planted there) could watch or replace what the driver puts in it.
#[cfg(unix)]
fn private_dir(base: &std::path::Path, uid: u32) -> Option<std::path::PathBuf> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
    let dir = base.join(format!("vqclip-runtime-{uid}"));
    let _ = std::fs::DirBuilder::new().mode(0o700).create(&dir);
    let meta = std::fs::symlink_metadata(&dir).ok()?;
    if !meta.is_dir() || meta.uid() != uid {
        return None;
    }
    if meta.mode() & 0o777 != 0o700 {
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).ok()?;
    }
    Some(dir)
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

/// One matrix-multiply-accumulate shape the adapter's cooperative-matrix (tensor core,
/// simdgroup matrix) units run: `C[M×N] += A[M×K] · B[K×N]`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct CooperativeMatrixConfig {
    /// Rows of A and C.
    pub m: u32,
    /// Columns of B and C.
    pub n: u32,
    /// Columns of A, rows of B.
    pub k: u32,
    /// Element type of A and B ("F32", "F16", "I32", "U32").
    pub ab_type: String,
    /// Element type of C and the result.
    pub cr_type: String,
    /// Whether integer accumulation saturates.
    pub saturating: bool,
}

/// What the adapter says about wgpu's `EXPERIMENTAL_COOPERATIVE_MATRIX` feature.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CooperativeMatrixSupport {
    /// The adapter offers the feature (wgpu offers it on Vulkan where the driver lists a
    /// configuration of sides 8 or 16 and f16, f32 or 32-bit integer elements).
    pub feature: bool,
    /// Every configuration wgpu accepted from the driver.
    pub configurations: Vec<CooperativeMatrixConfig>,
    /// Side of the square f16 × f16 → f32 configuration vqclip's f16 products would run
    /// on (`shaders/matmul_coop.wgsl`): 16 or 8; `None` where none fits. Whether they do
    /// also depends on `VQCLIP_COOP_MATRIX` and the adapter's default (see
    /// [`crate::ops::matmul::coop_default`]).
    pub f16_size: Option<u32>,
}

/// Cooperative-matrix support of the adapter `opts` picks (the one [`crate::Gpu::new`]
/// opens).
pub fn cooperative_matrix(opts: &DeviceOptions) -> Result<CooperativeMatrixSupport> {
    let adapter = choose(opts)?;
    let configurations = adapter
        .cooperative_matrix_properties()
        .iter()
        .map(|c| CooperativeMatrixConfig {
            m: c.m_size,
            n: c.n_size,
            k: c.k_size,
            ab_type: format!("{:?}", c.ab_type),
            cr_type: format!("{:?}", c.cr_type),
            saturating: c.saturating_accumulation,
        })
        .collect();
    Ok(CooperativeMatrixSupport {
        feature: adapter
            .features()
            .contains(wgpu::Features::EXPERIMENTAL_COOPERATIVE_MATRIX),
        configurations,
        f16_size: coop_f16_size(&adapter),
    })
}

/// The side `S` of the largest square `S×S×S` cooperative-matrix configuration with f16
/// A and B and f32 accumulation that `adapter` lists and wgpu can use (16 or 8), if it
/// offers `EXPERIMENTAL_COOPERATIVE_MATRIX` at all.
pub(crate) fn coop_f16_size(adapter: &wgpu::Adapter) -> Option<u32> {
    if !adapter
        .features()
        .contains(wgpu::Features::EXPERIMENTAL_COOPERATIVE_MATRIX)
    {
        return None;
    }
    let configs = adapter.cooperative_matrix_properties();
    [16, 8].into_iter().find(|&s| {
        configs.iter().any(|c| {
            (c.m_size, c.n_size, c.k_size) == (s, s, s)
                && c.ab_type == wgpu::CooperativeScalarType::F16
                && c.cr_type == wgpu::CooperativeScalarType::F32
        })
    })
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

    #[cfg(unix)]
    #[test]
    fn the_runtime_dir_is_replaced_only_when_invalid_and_made_private() {
        use std::ffi::OsStr;
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let base = tempfile::tempdir().unwrap();
        assert!(needs_runtime_dir(None));
        assert!(needs_runtime_dir(Some(OsStr::new(""))));
        assert!(needs_runtime_dir(Some(OsStr::new("relative/dir"))));
        assert!(needs_runtime_dir(Some(OsStr::new("/no/such/vqclip/dir"))));
        assert!(!needs_runtime_dir(Some(base.path().as_os_str())));
        let uid = std::fs::metadata(base.path()).unwrap().uid();
        let dir = private_dir(base.path(), uid).unwrap();
        let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().mode() & 0o777;
        assert_eq!(mode(&dir), 0o700);
        // An existing folder left too open is tightened; someone else's is not used.
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        assert_eq!(private_dir(base.path(), uid), Some(dir.clone()));
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(private_dir(base.path(), uid + 1), None);
        // A link planted where the folder should be is refused.
        let other = tempfile::tempdir().unwrap();
        let link = base.path().join(format!("vqclip-runtime-{}", uid + 2));
        std::os::unix::fs::symlink(other.path(), &link).unwrap();
        assert_eq!(private_dir(base.path(), uid + 2), None);
    }

    #[test]
    fn cooperative_matrix_support_is_reported_for_the_chosen_adapter() {
        let opts = DeviceOptions::from_env().unwrap();
        let c = cooperative_matrix(&opts).unwrap();
        for cfg in &c.configurations {
            assert!(cfg.m > 0 && cfg.n > 0 && cfg.k > 0, "{cfg:?}");
        }
        // The f16 size is one of the listed f16 -> f32 squares, and only with the feature.
        if let Some(s) = c.f16_size {
            assert!(c.feature);
            assert!(
                c.configurations.iter().any(|x| (x.m, x.n, x.k) == (s, s, s)
                    && x.ab_type == "F16"
                    && x.cr_type == "F32"),
                "{c:?}"
            );
        }
        // The device opens with the feature exactly where that size exists (and the
        // subgroups and f16 its kernel needs), unless VQCLIP_COOP_MATRIX=off.
        let gpu = crate::Gpu::new(&opts).unwrap();
        let off = crate::ops::env::COOP_MATRIX.get().as_deref() == Some("off");
        let usable = gpu
            .features()
            .contains(wgpu::Features::SHADER_F16 | wgpu::Features::SUBGROUP);
        let expect = c.f16_size.filter(|_| usable && !off);
        assert_eq!(gpu.coop_f16_size(), expect);
        assert_eq!(
            gpu.features()
                .contains(wgpu::Features::EXPERIMENTAL_COOPERATIVE_MATRIX),
            expect.is_some()
        );
    }

    #[test]
    fn adapter_that_matches_nothing_is_an_error() {
        let opts = DeviceOptions {
            backend: None,
            adapter: Some("no-such-adapter-xyz".into()),
            max_memory: None,
        };
        let e = choose(&opts).unwrap_err().to_string();
        assert!(
            e.contains("no-such-adapter-xyz") || e.contains("no GPU adapter"),
            "{e}"
        );
    }
}
