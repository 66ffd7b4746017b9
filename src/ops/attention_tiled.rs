//! The workgroup-memory attention forward for GPUs (`shaders/attention_tiled.wgsl`) and the
//! choice between it and the broadcast kernel (`attn` in `shaders/attention.wgsl`). Both
//! compute the same thing through the same params, bindings and split combine; which one
//! [`super::attention`] and its siblings dispatch is [`forward`]'s answer.

use super::attention::{attention_shader, ov, Params};
use super::CPU_LOOP_LIMIT;
use crate::gpu::{Gpu, Override, Shader};

/// Keys per workgroup tile (`KT` in the shader).
pub(super) const KT: Override<u32> = Override::new("KT");

pub(crate) static SHADER: Shader<Params> =
    attention_shader!("attention_tiled" = "attention_tiled", ["elem_f32"], KT);
/// [`SHADER`] on f16 q, k, v and output (`--precision f16` inference); scores, softmax,
/// tiles and accumulation stay f32.
pub(crate) static SHADER_F16: Shader<Params> = attention_shader!(
    "attention_tiled_f16" = "attention_tiled",
    ["f16", "elem_f16"],
    KT
);

/// vec4s in each of the shader's two workgroup tiles (`TILE4`).
const TILE4: usize = 512;
/// Workgroup memory the kernel declares: a K and a V tile of [`TILE4`] vec4s, 16 KiB (the
/// WebGPU minimum of `max_compute_workgroup_storage_size`).
pub const WORKGROUP_BYTES: u32 = (2 * TILE4 * 16) as u32;
/// Loop iterations one invocation may spend (kept below [`CPU_LOOP_LIMIT`]).
const LOOP_BUDGET: usize = CPU_LOOP_LIMIT * 3 / 4;

/// Which kernel computes the attention forward.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Forward {
    /// `attn`: each lane reads every key and value row itself (uniform loads, which CPU
    /// Vulkan turns into one load and a broadcast).
    Broadcast,
    /// `attn_tiled`: key and value tiles staged in workgroup memory, shared by the
    /// workgroup's queries.
    Tiled,
}

impl Forward {
    /// Both kernels, for tuning.
    pub const ALL: [Forward; 2] = [Forward::Broadcast, Forward::Tiled];

    /// The name used by `VQCLIP_ATTENTION_FORWARD` and the [`TUNING_KEY`] entry.
    pub fn name(self) -> &'static str {
        match self {
            Forward::Broadcast => "broadcast",
            Forward::Tiled => "tiled",
        }
    }

    /// Parses [`Forward::name`].
    pub fn parse(s: &str) -> Option<Forward> {
        Forward::ALL.into_iter().find(|f| f.name() == s.trim())
    }
}

/// The tuning key [`forward`] reads and `bench all --tune` writes.
pub const TUNING_KEY: &str = "attention_forward";

/// The forward kernel for this device: `VQCLIP_ATTENTION_FORWARD=broadcast|tiled` if set,
/// else the [`TUNING_KEY`] entry (`bench all --tune` times both on a CLIP ViT-B/32 batch),
/// else broadcast on CPU adapters and tiled on GPUs; broadcast wherever the tiles do not
/// fit ([`tiled_fits`]).
///
/// Why broadcast on CPU: lavapipe runs a workgroup's lanes as SIMD lanes of one thread, so
/// attn's uniform key loads already cost one load each, and the tiled kernel adds a copy
/// into workgroup memory and two barriers per tile (see docs/perf.md for the figures).
/// GPUs serve a workgroup's K/V rows from workgroup memory instead of each lane reading
/// them from global memory; not measured on a GPU yet.
pub fn forward(gpu: &Gpu) -> Forward {
    let forced = super::env::ATTENTION_FORWARD
        .get()
        .and_then(|s| Forward::parse(&s));
    let tuned = || gpu.tuning(TUNING_KEY).and_then(|s| Forward::parse(&s));
    choose(forced.or_else(tuned), gpu.is_cpu(), tiled_fits(gpu))
}

/// [`forward`]'s rule: the forced or tuned kernel if any, else by adapter kind; never a
/// tiled kernel that does not fit.
fn choose(asked: Option<Forward>, cpu: bool, fits: bool) -> Forward {
    let default = if cpu {
        Forward::Broadcast
    } else {
        Forward::Tiled
    };
    match asked.unwrap_or(default) {
        Forward::Tiled if !fits => Forward::Broadcast,
        f => f,
    }
}

/// Whether the adapter gives a workgroup the [`WORKGROUP_BYTES`] the tiles take (every
/// conforming WebGPU adapter does).
pub fn tiled_fits(gpu: &Gpu) -> bool {
    gpu.limits().max_compute_workgroup_storage_size >= WORKGROUP_BYTES
}

/// Keys per tile for head dim `d` (1..=512): as many whole groups of 4 rows as a tile of
/// [`TILE4`] vec4s holds (the kernel scores 4 keys at a time): 32 at D = 64, 4 at D = 512.
pub(super) fn keys_per_tile(d: usize) -> usize {
    (TILE4 / d.div_ceil(4)) / 4 * 4
}

/// Keys per split (a multiple of [`keys_per_tile`]) so that one invocation of a workgroup
/// of `wg` stays within [`LOOP_BUDGET`]: `d4` steps to load its query and `d` to store;
/// per tile `⌈kt·d4/wg⌉` staging steps and `2·d4 + 1` per 4 keys.
pub(super) fn keys_per_split(d: usize, wg: usize) -> usize {
    let d4 = d.div_ceil(4);
    let kt = keys_per_tile(d);
    let per_tile = (kt * d4).div_ceil(wg) + 1 + kt / 4 * (2 * d4 + 1);
    kt * ((LOOP_BUDGET - d4 - d) / per_tile).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiles_fit_the_workgroup_memory_and_splits_hold_whole_tiles() {
        assert_eq!(keys_per_tile(64), 32);
        assert_eq!(keys_per_tile(512), 4);
        assert_eq!(keys_per_tile(5), 256);
        for d in 1..=512 {
            let kt = keys_per_tile(d);
            assert!(
                kt >= 4 && kt.is_multiple_of(4) && kt * d.div_ceil(4) <= TILE4,
                "D {d}"
            );
            for wg in [8, 64] {
                let kps = keys_per_split(d, wg);
                assert!(kps >= kt && kps.is_multiple_of(kt), "D {d} wg {wg}: {kps}");
            }
        }
        // D = 512 on 8 lanes: 4-key tiles cost 64 + 1 + 257 steps, 150 of them per split.
        assert_eq!(keys_per_split(512, 8), 600);
    }

    #[test]
    fn gpus_default_to_tiled_cpus_to_broadcast_and_a_choice_overrides_both() {
        use Forward::{Broadcast, Tiled};
        assert_eq!(choose(None, false, true), Tiled);
        assert_eq!(choose(None, true, true), Broadcast);
        assert_eq!(choose(Some(Tiled), true, true), Tiled);
        assert_eq!(choose(Some(Broadcast), false, true), Broadcast);
        // Tiles that do not fit the adapter's workgroup memory: broadcast, whatever asked.
        assert_eq!(choose(None, false, false), Broadcast);
        assert_eq!(choose(Some(Tiled), true, false), Broadcast);
    }

    #[test]
    fn names_round_trip() {
        for f in Forward::ALL {
            assert_eq!(Forward::parse(f.name()), Some(f));
        }
        assert_eq!(Forward::parse("flash"), None);
    }
}
