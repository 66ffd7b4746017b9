//! The GPU device: adapter choice, limits, buffer pool, pipeline cache and batched dispatch.
//!
//! Every op records its dispatch into one shared command encoder; the encoder is submitted
//! when it holds many dispatches, when its uniform arena is full, or when the caller reads a
//! result back. Nothing waits on the GPU except a readback or an explicit [`Gpu::sync`].

mod adapter;
mod contract;
mod derived;
mod pool;
pub mod profile;

pub use adapter::{
    cooperative_matrix, default_memory_budget, list_adapters, prepare_driver_environment,
    AdapterSummary, Backend, CooperativeMatrixConfig, CooperativeMatrixSupport, DeviceOptions,
};
pub use contract::{
    Contract, Field, Override, OverrideDecl, OverrideValue, ParamsLayout, Scalar, ShaderParams,
    WgslField,
};
pub use pool::human_bytes;
pub(crate) use pool::PooledBuffer;

use crate::{Error, Result};
use pool::Pool;
use std::collections::HashMap;
use std::marker::PhantomData;
use std::sync::{Arc, Mutex, MutexGuard};

/// A WGSL source file compiled once per device, with the Rust side of its contract: the
/// params struct `P` uploaded to `@binding(0)` and the `override` constants the runtime may
/// set. `ops::contract_tests` checks both against the parsed shader.
pub struct Shader<P> {
    /// Name used in errors and as the module cache key: the file's name, or another for a
    /// second module assembled from the same file with other libraries (an f16 twin).
    pub name: &'static str,
    /// The main file, `shaders/<file>.wgsl`.
    pub file: &'static str,
    /// The WGSL text.
    pub source: &'static str,
    /// The override constants kernels of this shader may set.
    pub overrides: &'static [OverrideDecl],
    /// Ties the shader to its params type, so a dispatch cannot upload another struct.
    pub params: PhantomData<fn(P)>,
}

impl<P> std::fmt::Debug for Shader<P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Shader({})", self.name)
    }
}

impl<P: ShaderParams> Shader<P> {
    /// The shader's contract, for the test that checks it against the WGSL.
    pub fn contract(&self) -> Contract {
        Contract {
            name: self.name,
            file: self.file,
            source: self.source,
            params: P::LAYOUT,
            overrides: self.overrides,
        }
    }
}

/// Declares a [`Shader`] from `shaders/<name>.wgsl`, optionally prefixed at compile time by
/// shared function files from `shaders/lib/` (WGSL has no `#include`), with the `override`
/// constants ([`Override`] consts) that kernels of it may set:
/// `shader!("matmul", "act", "matmul_epilogue", overrides = [TRANS_A, TRANS_B])`.
/// `shader!("matmul_f16" = "matmul", "matmul_b_f16", ..)` names a second module of the same
/// file assembled with other libraries. The params type comes from the static's type,
/// `Shader<Params>`.
#[macro_export]
macro_rules! shader {
    ($name:literal = $file:literal $(, $lib:literal)* $(, overrides = [$($ov:expr),* $(,)?])? $(,)?) => {
        $crate::gpu::Shader {
            name: $name,
            file: $file,
            source: concat!(
                $(include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/shaders/lib/", $lib, ".wgsl")),)*
                include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/shaders/", $file, ".wgsl"))
            ),
            overrides: &[$($($ov.decl()),*)?],
            params: ::std::marker::PhantomData,
        }
    };
    ($name:literal $(, $lib:literal)* $(, overrides = [$($ov:expr),* $(,)?])? $(,)?) => {
        $crate::shader!($name = $name $(, $lib)* $(, overrides = [$($ov),*])?)
    };
}

/// One specialisation of a shader entry point: `override` constants fixed by name.
pub struct Kernel<P: 'static> {
    /// The shader module.
    pub shader: &'static Shader<P>,
    /// The `@compute` entry point.
    pub entry: &'static str,
    /// Values for the shader's `override` declarations (bools as 0/1).
    pub constants: Vec<(&'static str, f64)>,
}

impl<P: 'static> Clone for Kernel<P> {
    fn clone(&self) -> Self {
        Kernel {
            shader: self.shader,
            entry: self.entry,
            constants: self.constants.clone(),
        }
    }
}

impl<P: 'static> std::fmt::Debug for Kernel<P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.key())
    }
}

impl<P: 'static> Kernel<P> {
    /// A kernel with no overrides set.
    pub fn new(shader: &'static Shader<P>, entry: &'static str) -> Self {
        Kernel {
            shader,
            entry,
            constants: Vec::new(),
        }
    }
    /// Sets an `override` constant, one the shader's [`shader!`](crate::shader) call lists
    /// (the list the contract test checks against the WGSL).
    pub fn with<T: OverrideValue>(mut self, o: Override<T>, value: T) -> Self {
        debug_assert!(
            self.shader.overrides.contains(&o.decl()),
            "override {} is not listed for shader {}",
            o.name,
            self.shader.name
        );
        self.constants.push((o.name, value.into()));
        self
    }
    fn key(&self) -> String {
        let mut k = format!("{}:{}", self.shader.name, self.entry);
        for (n, v) in &self.constants {
            k.push_str(&format!(":{n}={v}"));
        }
        k
    }
}

/// A storage buffer range bound to one `@binding` of a kernel.
#[derive(Clone, Copy)]
pub struct Binding<'a> {
    pub(crate) buffer: &'a wgpu::Buffer,
    pub(crate) size: u64,
}

/// Dispatches recorded before an automatic submit.
const MAX_DISPATCHES_PER_SUBMIT: usize = 256;
/// Bytes of the per-submit uniform arena that holds every dispatch's params struct.
const ARENA_BYTES: u64 = 1 << 16;

struct Recorder {
    encoder: Option<wgpu::CommandEncoder>,
    /// The open compute pass of `encoder`: consecutive dispatches share one pass (wgpu
    /// orders their storage accesses inside it), ended before a copy or a submit.
    pass: Option<wgpu::ComputePass<'static>>,
    dispatches: usize,
    arena: wgpu::Buffer,
    arena_cpu: Vec<u8>,
}

struct Cached {
    pipeline: wgpu::ComputePipeline,
    layout: wgpu::BindGroupLayout,
}

/// Most bind groups [`GpuInner::bind_groups`] holds before it starts again.
const BIND_GROUP_CACHE: usize = 16_384;

/// What a dispatch's bind group is made of: the pipeline (its [`Cached`] entry, which lives
/// as long as the device), the params' offset in the arena and the storage buffers with
/// their bound sizes.
#[derive(PartialEq, Eq, Hash)]
struct BindKey {
    pipeline: usize,
    offset: u64,
    buffers: Vec<(wgpu::Buffer, u64)>,
}

pub(crate) struct GpuInner {
    pub(crate) device: wgpu::Device,
    pub(crate) queue: wgpu::Queue,
    info: wgpu::AdapterInfo,
    limits: wgpu::Limits,
    features: wgpu::Features,
    /// Side of the square f16 × f16 → f32 cooperative-matrix configuration the device was
    /// opened for (16, or 8), if any ([`Gpu::coop_f16_size`]).
    coop_f16: Option<u32>,
    modules: Mutex<HashMap<&'static str, wgpu::ShaderModule>>,
    pipelines: Mutex<HashMap<String, Arc<Cached>>>,
    pool: Mutex<Pool>,
    rec: Mutex<Recorder>,
    slot: u64,
    submits: std::sync::atomic::AtomicU64,
    tuning: Mutex<HashMap<String, String>>,
    derived: Mutex<derived::Derived>,
    /// Bind groups made by [`Gpu::dispatch`], kept for the next dispatch of the same
    /// pipeline on the same buffers at the same params offset (a loop's steps repeat their
    /// dispatches on the pool's recycled buffers). Cleared when the pool releases buffers,
    /// so that it never keeps a released buffer alive, and when it grows past
    /// [`BIND_GROUP_CACHE`].
    bind_groups: Mutex<HashMap<BindKey, wgpu::BindGroup>>,
    dummy: wgpu::Buffer,
    /// The first GPU error no error scope caught (from wgpu's uncaptured-error handler or
    /// the device-lost callback), returned by the next [`Gpu::sync`], readback or
    /// allocation. It stays set: work recorded after an error cannot be trusted.
    fault: Arc<Mutex<Option<String>>>,
}

/// The message of a GPU error raised while doing `what`.
fn describe(what: &str, e: &wgpu::Error) -> String {
    match e {
        wgpu::Error::OutOfMemory { .. } => format!(
            "the GPU ran out of memory while {what}: try a smaller image size, fewer cutouts or \
             a smaller batch, --recompute, or close other programs using the GPU"
        ),
        wgpu::Error::Validation { description, .. } => format!(
            "GPU validation error while {what} (most likely a vqclip engine bug; please \
             report it with this message): {}",
            description.trim()
        ),
        wgpu::Error::Internal { description, .. } => {
            format!(
                "internal GPU driver error while {what}: {}",
                description.trim()
            )
        }
    }
}

/// Keeps the first error in `slot`.
fn record(slot: &Mutex<Option<String>>, msg: String) {
    lock(slot).get_or_insert(msg);
}

/// Revision of the tunable kernels (matmul variants and their tiles). Raised when a
/// change can alter which variant wins, so that remembered choices are measured again.
pub const KERNELS_REVISION: u32 = 3;

/// A handle to the chosen GPU device. Cheap to clone; all clones share one device, pool,
/// pipeline cache and command recorder.
#[derive(Clone)]
pub struct Gpu(pub(crate) Arc<GpuInner>);

impl std::fmt::Debug for Gpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Gpu({} / {:?})", self.0.info.name, self.0.info.backend)
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding one of these locks leaves plain data behind; keep going.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Gpu {
    /// Opens the best adapter allowed by `opts` (discrete > integrated > virtual > CPU).
    pub fn new(opts: &DeviceOptions) -> Result<Gpu> {
        Gpu::new_without(opts, wgpu::Features::empty())
    }

    /// [`Gpu::new`] with the optional features in `drop` left off even where the adapter
    /// has them (tests of the errors a missing feature gives).
    pub(crate) fn new_without(opts: &DeviceOptions, drop: wgpu::Features) -> Result<Gpu> {
        let adapter = adapter::choose(opts)?;
        let info = adapter.get_info();
        let limits = adapter.limits();
        let wanted =
            wgpu::Features::SHADER_F16 | wgpu::Features::SUBGROUP | wgpu::Features::TIMESTAMP_QUERY;
        let mut features = adapter.features() & wanted & !drop;
        // Cooperative matrices (tensor cores) for the f16 products, where the adapter runs
        // an f16 × f16 → f32 configuration vqclip's kernel is written for (and subgroups,
        // which the kernel's layout needs, with room for four of them in a workgroup),
        // unless VQCLIP_COOP_MATRIX=off.
        let mut coop_f16 = adapter::coop_f16_size(&adapter)
            .filter(|_| {
                // The kernel's workgroup holds four subgroups of the largest size.
                let wg = 4 * info.subgroup_max_size;
                features.contains(wgpu::Features::SHADER_F16 | wgpu::Features::SUBGROUP)
                    && wg <= limits.max_compute_invocations_per_workgroup
                    && wg <= limits.max_compute_workgroup_size_x
                    && !drop.contains(wgpu::Features::EXPERIMENTAL_COOPERATIVE_MATRIX)
            })
            .map(|s| crate::ops::env::COOP_MATRIX.checked().map(|v| (v, s)))
            .transpose()?
            .and_then(|(v, s)| (v.as_deref() != Some("off")).then_some(s));
        let open = |features: wgpu::Features| {
            let experimental_features =
                if features.contains(wgpu::Features::EXPERIMENTAL_COOPERATIVE_MATRIX) {
                    // SAFETY: wgpu marks the feature experimental: its implementation may
                    // still have bugs. Only `shaders/matmul_coop.wgsl` uses it, on products
                    // whose results the tests compare with the CPU reference;
                    // VQCLIP_COOP_MATRIX=off keeps it off the device.
                    unsafe { wgpu::ExperimentalFeatures::enabled() }
                } else {
                    wgpu::ExperimentalFeatures::disabled()
                };
            pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
                label: Some("vqclip"),
                required_features: features,
                required_limits: limits.clone(),
                experimental_features,
                memory_hints: wgpu::MemoryHints::Performance,
                trace: wgpu::Trace::Off,
            }))
        };
        let (device, queue) = match coop_f16 {
            // A driver that lists the configuration but will not open a device with the
            // experimental feature still runs everything else: open it without.
            Some(_) => open(features | wgpu::Features::EXPERIMENTAL_COOPERATIVE_MATRIX)
                .inspect(|_| features |= wgpu::Features::EXPERIMENTAL_COOPERATIVE_MATRIX)
                .or_else(|_| {
                    coop_f16 = None;
                    open(features)
                }),
            None => open(features),
        }
        .map_err(|e| Error::Device(e.to_string()))?;
        // wgpu's default handler panics; errors outside an error scope (a bind group or a
        // dispatch, say) are kept instead and returned at the next sync or readback.
        let fault = Arc::new(Mutex::new(None));
        let slot = fault.clone();
        device.on_uncaptured_error(Arc::new(move |e: wgpu::Error| {
            record(&slot, describe("running GPU work", &e));
        }));
        let slot = fault.clone();
        device.set_device_lost_callback(move |reason, msg| {
            if reason != wgpu::DeviceLostReason::Destroyed {
                record(
                    &slot,
                    format!(
                        "the GPU device was lost ({reason:?}): {msg}; the driver may have \
                             reset it after a fault or a time-out"
                    ),
                );
            }
        });
        let budget = opts
            .max_memory
            .or_else(|| adapter::default_memory_budget(&info));
        let slot = (limits.min_uniform_buffer_offset_alignment as u64).max(256);
        let arena = device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("params arena"),
            size: ARENA_BYTES,
            usage: wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        let dummy = device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("unused binding"),
            size: 256,
            usage: wgpu::BufferUsages::STORAGE,
            mapped_at_creation: false,
        });
        Ok(Gpu(Arc::new(GpuInner {
            device,
            queue,
            info,
            limits,
            features,
            coop_f16,
            modules: Mutex::new(HashMap::new()),
            pipelines: Mutex::new(HashMap::new()),
            pool: Mutex::new(Pool::with_budget(budget)),
            rec: Mutex::new(Recorder {
                encoder: None,
                pass: None,
                dispatches: 0,
                arena,
                arena_cpu: Vec::with_capacity(ARENA_BYTES as usize),
            }),
            slot,
            submits: std::sync::atomic::AtomicU64::new(0),
            tuning: Mutex::new(HashMap::new()),
            derived: Mutex::new(derived::Derived::default()),
            bind_groups: Mutex::new(HashMap::new()),
            dummy,
            fault,
        })))
    }

    /// A process-wide device opened from the environment (`VQCLIP_BACKEND`, `VQCLIP_ADAPTER`);
    /// used by tests and benches so that they share one device.
    pub fn shared() -> Result<Gpu> {
        static SHARED: std::sync::OnceLock<std::result::Result<Gpu, String>> =
            std::sync::OnceLock::new();
        SHARED
            .get_or_init(|| {
                DeviceOptions::from_env()
                    .and_then(|o| Gpu::new(&o))
                    .map_err(|e| e.to_string())
            })
            .clone()
            .map_err(Error::NoAdapter)
    }

    /// The adapter's description (name, backend, device type, driver).
    pub fn info(&self) -> &wgpu::AdapterInfo {
        &self.0.info
    }
    /// The limits the device was opened with (the adapter's real limits).
    pub fn limits(&self) -> &wgpu::Limits {
        &self.0.limits
    }
    /// Optional features enabled on the device.
    pub fn features(&self) -> wgpu::Features {
        self.0.features
    }
    /// The side `S` of the `S×S×S` f16 × f16 → f32 cooperative-matrix configuration the
    /// f16 products run on ([`crate::ops::matmul::Variant::Coop`]): 16 where the adapter
    /// lists it (NVIDIA, AMD), else 8 (lavapipe of Mesa 26.1; 25.0 lists none); `None` where the adapter
    /// offers neither, lacks subgroups or f16, or `VQCLIP_COOP_MATRIX=off`.
    pub fn coop_f16_size(&self) -> Option<u32> {
        self.0.coop_f16
    }
    /// Errors unless the device has `SHADER_F16` (f16 tensors and the f16 matmul kernels
    /// need it); `what` names what needed it.
    pub fn require_f16(&self, what: &str) -> Result<()> {
        if self.0.features.contains(wgpu::Features::SHADER_F16) {
            return Ok(());
        }
        Err(Error::invalid(format!(
            "{what} needs f16 shader support (the SHADER_F16 feature), which the adapter \
             \"{}\" ({:?}) does not offer; use --precision f32",
            self.0.info.name, self.0.info.backend
        )))
    }
    /// True when the adapter is a CPU implementation such as lavapipe.
    pub fn is_cpu(&self) -> bool {
        self.0.info.device_type == wgpu::DeviceType::Cpu
    }
    /// The raw wgpu device (for callers that need something the engine lacks).
    pub fn device(&self) -> &wgpu::Device {
        &self.0.device
    }
    /// Number of command submissions so far (for tests of batching).
    pub fn submit_count(&self) -> u64 {
        self.0.submits.load(std::sync::atomic::Ordering::Relaxed)
    }
    /// Bytes currently held by live tensors and by the pool's free lists.
    pub fn memory(&self) -> pool::PoolStats {
        lock(&self.0.pool).stats()
    }
    /// Resets the peak-memory counter to the current live bytes.
    pub fn reset_peak(&self) {
        lock(&self.0.pool).reset_peak()
    }
    /// Bind groups kept for reuse ([`GpuInner::bind_groups`]).
    #[cfg(test)]
    pub(crate) fn bind_groups_cached(&self) -> usize {
        lock(&self.0.bind_groups).len()
    }

    /// Releases every idle pooled buffer (and the cached bind groups, which would keep them).
    pub fn trim(&self) {
        // The pool's lock first, then the cache's, as in the pool's own release.
        let mut pool = lock(&self.0.pool);
        pool.trim();
        lock(&self.0.bind_groups).clear();
    }
    /// Most bytes the buffer pool may hold ([`DeviceOptions::max_memory`] or
    /// [`default_memory_budget`]); `None`: no budget.
    pub fn memory_budget(&self) -> Option<u64> {
        lock(&self.0.pool).budget()
    }

    /// The GPU error recorded outside an error scope, if any, as an `Err`.
    pub fn check_fault(&self) -> Result<()> {
        match lock(&self.0.fault).as_ref() {
            Some(msg) => Err(Error::Gpu(msg.clone())),
            None => Ok(()),
        }
    }

    /// Runs `f` (which creates GPU objects) inside out-of-memory and validation error
    /// scopes, so that what it raises comes back as an [`Error::Gpu`] saying it happened
    /// while doing `what`. Scopes are per thread and cost a lock each: they wrap object
    /// creation and submission, not every dispatch.
    pub(crate) fn scoped<T>(&self, what: &str, f: impl FnOnce() -> T) -> Result<T> {
        let d = &self.0.device;
        let oom = d.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
        let invalid = d.push_error_scope(wgpu::ErrorFilter::Validation);
        let out = f();
        // Native wgpu resolves these futures at once.
        let invalid = pollster::block_on(invalid.pop());
        let oom = pollster::block_on(oom.pop());
        match oom.or(invalid) {
            Some(e) => Err(Error::Gpu(describe(what, &e))),
            None => Ok(out),
        }
    }

    /// A buffer created inside error scopes: too large, out of memory or otherwise invalid
    /// comes back as an `Err`.
    pub(crate) fn create_buffer(
        &self,
        what: &str,
        size: u64,
        usage: wgpu::BufferUsages,
    ) -> Result<wgpu::Buffer> {
        self.scoped(
            &format!("allocating a {size}-byte buffer for {what}"),
            || {
                self.0.device.create_buffer(&wgpu::BufferDescriptor {
                    label: Some(what),
                    size,
                    usage,
                    mapped_at_creation: false,
                })
            },
        )
    }

    /// Remembered choice for a tuning key (e.g. which matmul variant won on this adapter):
    /// one set in this process, else one that `vqclip bench` measured earlier on the same
    /// adapter, driver and vqclip version (the tuning file, see [`tuning_file`]).
    pub fn tuning(&self, key: &str) -> Option<String> {
        let mut t = lock(&self.0.tuning);
        if let Some(v) = t.get(key) {
            return Some(v.clone());
        }
        let v = tuning_file().and_then(|f| read_tuning(&f, &self.tuning_scope(), key))?;
        t.insert(key.to_string(), v.clone());
        Some(v)
    }
    /// Stores a tuning choice for this device in this process only.
    pub fn set_tuning(&self, key: &str, value: &str) {
        lock(&self.0.tuning).insert(key.to_string(), value.to_string());
    }
    /// Stores a tuning choice for this device and records it in the tuning file for later runs.
    pub fn save_tuning(&self, key: &str, value: &str) -> Result<()> {
        self.set_tuning(key, value);
        let Some(path) = tuning_file() else {
            return Ok(());
        };
        let mut all: serde_json::Map<String, serde_json::Value> = std::fs::read(&path)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        let scope = all
            .entry(self.tuning_scope())
            .or_insert_with(|| serde_json::json!({}));
        if let Some(o) = scope.as_object_mut() {
            o.insert(key.to_string(), value.into());
        }
        let io = |source| Error::Io {
            path: path.display().to_string(),
            source,
        };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(io)?;
        }
        let text = serde_json::to_vec_pretty(&all).map_err(|e| Error::invalid(e.to_string()))?;
        // A unique temporary name per writer: concurrent `bench` runs each replace the file
        // whole (the last one wins) instead of racing on one fixed `.tmp` name.
        crate::atomic::write(&path, &text)
    }
    /// The key tuning choices are kept under: the adapter, its driver, and the version
    /// of vqclip and of its kernels, so that a choice measured on other kernels is not
    /// reused.
    fn tuning_scope(&self) -> String {
        let i = &self.0.info;
        format!(
            "{} | {:?} | {} {} | vqclip {} kernels {}",
            i.name,
            i.backend,
            i.driver,
            i.driver_info,
            crate::VERSION,
            KERNELS_REVISION
        )
    }

    /// A small read-only buffer for bindings a specialisation never reads (an optional bias,
    /// say): WGSL bindings cannot be left empty, and binding the output there would conflict.
    pub fn unused_binding(&self) -> Binding<'_> {
        Binding {
            buffer: &self.0.dummy,
            size: 256,
        }
    }

    /// Checks a buffer size against `max_buffer_size` and `max_storage_buffer_binding_size`.
    pub fn check_size(&self, what: &str, bytes: u64) -> Result<()> {
        let l = &self.0.limits;
        if bytes > l.max_buffer_size {
            return Err(Error::TooLarge {
                what: what.to_string(),
                needed: bytes,
                limit: l.max_buffer_size,
                hint: "max_buffer_size",
            });
        }
        if bytes > l.max_storage_buffer_binding_size {
            return Err(Error::TooLarge {
                what: what.to_string(),
                needed: bytes,
                limit: l.max_storage_buffer_binding_size,
                hint: "max_storage_buffer_binding_size",
            });
        }
        Ok(())
    }

    pub(crate) fn alloc(&self, bytes: u64) -> Result<PooledBuffer> {
        self.check_size("tensor", bytes)?;
        self.check_fault()?;
        pool::alloc(self, bytes)
    }

    fn pipeline<P: 'static>(&self, k: &Kernel<P>) -> Arc<Cached> {
        let key = k.key();
        if let Some(p) = lock(&self.0.pipelines).get(&key) {
            return p.clone();
        }
        // `dispatch` returns nothing (ops record work and fail at readback), so an invalid
        // shader or kernel is recorded with its name and returned by the next sync or readback.
        let guard = self
            .0
            .device
            .push_error_scope(wgpu::ErrorFilter::Validation);
        let module = {
            let mut mods = lock(&self.0.modules);
            mods.entry(k.shader.name)
                .or_insert_with(|| {
                    self.0
                        .device
                        .create_shader_module(wgpu::ShaderModuleDescriptor {
                            label: Some(k.shader.name),
                            source: wgpu::ShaderSource::Wgsl(k.shader.source.into()),
                        })
                })
                .clone()
        };
        let pipeline = self
            .0
            .device
            .create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                label: Some(&key),
                layout: None,
                module: &module,
                entry_point: Some(k.entry),
                compilation_options: wgpu::PipelineCompilationOptions {
                    constants: &k.constants,
                    zero_initialize_workgroup_memory: false,
                },
                cache: None,
            });
        if let Some(e) = pollster::block_on(guard.pop()) {
            record(
                &self.0.fault,
                describe(&format!("compiling kernel {key}"), &e),
            );
        }
        let layout = pipeline.get_bind_group_layout(0);
        let c = Arc::new(Cached { pipeline, layout });
        lock(&self.0.pipelines).insert(key, c.clone());
        c
    }

    /// Records one dispatch: `params` goes to `@binding(0)` as a uniform, `bindings` to
    /// `@binding(1..)` as storage buffers, in order.
    pub fn dispatch<P: ShaderParams + 'static>(
        &self,
        kernel: &Kernel<P>,
        params: &P,
        bindings: &[Binding<'_>],
        workgroups: [u32; 3],
    ) {
        if workgroups.contains(&0) {
            return;
        }
        debug_assert!(workgroups.iter().all(|&w| w <= 65535));
        let cached = self.pipeline(kernel);
        let timer = profile::enabled().then(|| {
            // Finish earlier work first so that only this dispatch is timed.
            let _ = self.sync();
            std::time::Instant::now()
        });
        self.record(&cached, params, bindings, workgroups);
        if let Some(t0) = timer {
            let _ = self.sync();
            profile::add(kernel.key(), workgroups, t0.elapsed());
        }
    }

    fn record<P: bytemuck::Pod>(
        &self,
        cached: &Cached,
        params: &P,
        bindings: &[Binding<'_>],
        workgroups: [u32; 3],
    ) {
        let bytes = bytemuck::bytes_of(params);
        let padded = (bytes.len() as u64).div_ceil(16) * 16;
        let mut rec = lock(&self.0.rec);
        if rec.arena_cpu.len() as u64 + self.0.slot > ARENA_BYTES
            || rec.dispatches >= MAX_DISPATCHES_PER_SUBMIT
        {
            self.submit_locked(&mut rec);
        }
        let offset = rec.arena_cpu.len() as u64;
        rec.arena_cpu.extend_from_slice(bytes);
        rec.arena_cpu.resize((offset + self.0.slot) as usize, 0);
        let key = BindKey {
            pipeline: cached as *const Cached as usize,
            offset,
            buffers: bindings
                .iter()
                .map(|b| (b.buffer.clone(), b.size.max(4).div_ceil(4) * 4))
                .collect(),
        };
        let bg = {
            let mut cache = lock(&self.0.bind_groups);
            match cache.get(&key) {
                Some(bg) => bg.clone(),
                None => {
                    let bg = self.bind_group(cached, &rec.arena, offset, padded, &key.buffers);
                    if cache.len() >= BIND_GROUP_CACHE {
                        cache.clear();
                    }
                    cache.insert(key, bg.clone());
                    bg
                }
            }
        };
        if rec.pass.is_none() {
            let device = &self.0.device;
            let enc = rec.encoder.get_or_insert_with(|| {
                device.create_command_encoder(&wgpu::CommandEncoderDescriptor { label: None })
            });
            let pass = enc
                .begin_compute_pass(&wgpu::ComputePassDescriptor {
                    label: None,
                    timestamp_writes: None,
                })
                .forget_lifetime();
            rec.pass = Some(pass);
        }
        if let Some(pass) = rec.pass.as_mut() {
            pass.set_pipeline(&cached.pipeline);
            pass.set_bind_group(0, &bg, &[]);
            pass.dispatch_workgroups(workgroups[0], workgroups[1], workgroups[2]);
        }
        rec.dispatches += 1;
    }

    /// A bind group of `cached`'s layout: the params at `offset` (`size` bytes) in `arena` at
    /// binding 0, then `buffers` (buffer, bound size) at bindings 1...
    fn bind_group(
        &self,
        cached: &Cached,
        arena: &wgpu::Buffer,
        offset: u64,
        size: u64,
        buffers: &[(wgpu::Buffer, u64)],
    ) -> wgpu::BindGroup {
        let mut entries = Vec::with_capacity(buffers.len() + 1);
        entries.push(wgpu::BindGroupEntry {
            binding: 0,
            resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                buffer: arena,
                offset,
                size: wgpu::BufferSize::new(size),
            }),
        });
        for (i, (buffer, size)) in buffers.iter().enumerate() {
            entries.push(wgpu::BindGroupEntry {
                binding: i as u32 + 1,
                resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                    buffer,
                    offset: 0,
                    size: wgpu::BufferSize::new(*size),
                }),
            });
        }
        self.0.device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: None,
            layout: &cached.layout,
            entries: &entries,
        })
    }

    /// Records a buffer-to-buffer copy in stream order.
    pub(crate) fn copy(
        &self,
        src: &wgpu::Buffer,
        src_off: u64,
        dst: &wgpu::Buffer,
        dst_off: u64,
        bytes: u64,
    ) {
        if bytes == 0 {
            return;
        }
        let mut rec = lock(&self.0.rec);
        // A copy is not a compute command: the open pass ends first.
        rec.pass = None;
        let device = &self.0.device;
        let enc = rec.encoder.get_or_insert_with(|| {
            device.create_command_encoder(&wgpu::CommandEncoderDescriptor { label: None })
        });
        enc.copy_buffer_to_buffer(src, src_off, dst, dst_off, bytes);
    }

    fn submit_locked(&self, rec: &mut Recorder) -> Option<wgpu::SubmissionIndex> {
        rec.pass = None;
        let enc = rec.encoder.take()?;
        if !rec.arena_cpu.is_empty() {
            // Queue writes land before this submission's commands and after earlier ones,
            // so one arena can be refilled for every submission.
            self.0.queue.write_buffer(&rec.arena, 0, &rec.arena_cpu);
        }
        rec.arena_cpu.clear();
        rec.dispatches = 0;
        self.0
            .submits
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let submitted = self.scoped("submitting GPU work", || {
            self.0.queue.submit([enc.finish()])
        });
        match submitted {
            Ok(i) => Some(i),
            Err(e) => {
                record(&self.0.fault, e.to_string());
                None
            }
        }
    }

    /// Submits everything recorded so far without waiting.
    pub fn flush(&self) {
        let mut rec = lock(&self.0.rec);
        self.submit_locked(&mut rec);
    }

    /// Submits everything recorded so far and waits until the GPU has finished it; returns
    /// any GPU error raised since the device was opened (see [`Gpu::check_fault`]).
    pub fn sync(&self) -> Result<()> {
        self.flush();
        let polled = self.0.device.poll(wgpu::PollType::wait_indefinitely());
        // A lost device makes the poll fail too; its callback's message says more.
        self.check_fault()?;
        polled.map_err(|e| Error::Readback(e.to_string()))?;
        Ok(())
    }

    /// Writes bytes into a buffer, ordered after all previously recorded work.
    pub(crate) fn write(&self, dst: &wgpu::Buffer, offset: u64, data: &[u8]) {
        // Queue writes run before the pending encoder's commands, so submit those first:
        // `dst` may be a recycled buffer that recorded work still reads.
        self.flush();
        self.0.queue.write_buffer(dst, offset, data);
    }

    /// Copies `bytes` bytes of `src` back to the CPU (submits and waits).
    pub(crate) fn read(&self, src: &wgpu::Buffer, offset: u64, bytes: u64) -> Result<Vec<u8>> {
        if bytes == 0 {
            return Ok(Vec::new());
        }
        let size = bytes.div_ceil(4) * 4;
        let staging = self.create_buffer(
            "a readback",
            size,
            wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
        )?;
        self.copy(src, offset, &staging, 0, size);
        self.flush();
        let (tx, rx) = std::sync::mpsc::channel();
        staging.map_async(wgpu::MapMode::Read, .., move |r| {
            let _ = tx.send(r);
        });
        let polled = self.0.device.poll(wgpu::PollType::wait_indefinitely());
        self.check_fault()?;
        polled.map_err(|e| Error::Readback(e.to_string()))?;
        rx.recv()
            .map_err(|e| Error::Readback(e.to_string()))?
            .map_err(|e| Error::Readback(e.to_string()))?;
        let view = staging
            .get_mapped_range(..)
            .map_err(|e| Error::Readback(e.to_string()))?;
        let out = view[..bytes as usize].to_vec();
        drop(view);
        staging.unmap();
        Ok(out)
    }
}

/// Where measured kernel choices are kept: `$VQCLIP_TUNING_FILE`, else
/// `<user cache dir>/vqclip/tuning.json`. `VQCLIP_TUNING_FILE=""` turns the file off.
pub fn tuning_file() -> Option<std::path::PathBuf> {
    match std::env::var_os("VQCLIP_TUNING_FILE") {
        Some(p) if p.is_empty() => None,
        Some(p) => Some(p.into()),
        None => dirs::cache_dir().map(|d| d.join("vqclip").join("tuning.json")),
    }
}

fn read_tuning(path: &std::path::Path, scope: &str, key: &str) -> Option<String> {
    let all: serde_json::Value = serde_json::from_slice(&std::fs::read(path).ok()?).ok()?;
    all.get(scope)?.get(key)?.as_str().map(str::to_string)
}

/// Splits `n` workgroups over x and y so that neither exceeds 65,535. Kernels rebuild the
/// linear index with `grid_index` / `grid_group` (`shaders/lib/grid.wgsl`) and skip indices
/// past their element count.
pub fn grid_1d(n: u32) -> [u32; 3] {
    const MAX: u32 = 65535;
    if n <= MAX {
        [n, 1, 1]
    } else {
        [MAX, n.div_ceil(MAX), 1]
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_repeated_dispatch_reuses_its_bind_group_until_trim() {
        // A device of its own, so that no other test's dispatches are counted.
        let g = Gpu::new(&DeviceOptions::from_env().unwrap()).unwrap();
        let a = crate::Tensor::from_slice(&g, &[1.0f32; 64], &[64]).unwrap();
        let step = || {
            let y = crate::ops::elementwise::add(&a, &a).unwrap();
            assert_eq!(y.to_vec().unwrap(), vec![2.0f32; 64]);
        };
        step();
        let first = g.bind_groups_cached();
        assert!(first > 0);
        // The same op on recycled buffers at the same params offset: a hit, same result.
        step();
        step();
        assert_eq!(g.bind_groups_cached(), first);
        g.trim();
        assert_eq!(g.bind_groups_cached(), 0);
        step();
    }

    use super::*;

    /// A device of its own: a recorded fault stays, and must not fail other tests.
    fn own_device() -> Gpu {
        Gpu::new(&DeviceOptions::from_env().unwrap()).unwrap()
    }

    #[test]
    fn a_validation_error_in_a_scope_is_an_err() {
        let gpu = Gpu::shared().unwrap();
        let too_big = gpu.limits().max_buffer_size.saturating_add(4);
        let e = gpu
            .create_buffer("a test", too_big, wgpu::BufferUsages::STORAGE)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("GPU validation error while allocating") && e.contains("engine bug"),
            "{e}"
        );
        // The device goes on working.
        gpu.sync().unwrap();
    }

    #[test]
    fn an_uncaptured_error_comes_back_from_sync_instead_of_aborting() {
        let gpu = own_device();
        gpu.sync().unwrap();
        // Raw wgpu, outside any scope: the uncaptured-error handler used to abort here.
        let _bad = gpu.device().create_buffer(&wgpu::BufferDescriptor {
            label: Some("deliberately invalid"),
            size: 16,
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::MAP_WRITE,
            mapped_at_creation: false,
        });
        let e = gpu.sync().unwrap_err().to_string();
        assert!(e.contains("GPU validation error"), "{e}");
        // Later work is refused rather than run on a device in an unknown state.
        assert!(crate::Tensor::zeros(&gpu, &[4]).is_err());
    }

    crate::shader_params! {
        /// The params of the deliberately invalid shader below (never read by it).
        struct BadParams {
            a: u32,
            b: u32,
            c: u32,
            d: u32,
        }
    }

    #[test]
    fn a_kernel_that_does_not_compile_is_named_in_an_err() {
        static BAD: Shader<BadParams> = Shader {
            name: "deliberately_invalid",
            file: "deliberately_invalid",
            source: "@compute @workgroup_size(1) fn main() { let x: u32 = 1.5; }",
            overrides: &[],
            params: std::marker::PhantomData,
        };
        let gpu = own_device();
        let p = BadParams {
            a: 0,
            b: 0,
            c: 0,
            d: 0,
        };
        gpu.dispatch(&Kernel::new(&BAD, "main"), &p, &[], [1, 1, 1]);
        let e = gpu.sync().unwrap_err().to_string();
        assert!(
            e.contains("compiling kernel deliberately_invalid:main") && e.contains("engine bug"),
            "{e}"
        );
    }
}
