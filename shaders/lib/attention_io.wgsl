// The params, bindings and row loads shared by the attention forward kernels: `attn` and
// `attn_combine` (shaders/attention.wgsl) and `attn_tiled` (shaders/attention_tiled.wgsl),
// which share one Rust `attention::Params` and one dispatch. q, k, v and the output are
// `elem` (shaders/lib/elem_f32.wgsl, or elem_f16.wgsl for the f16-activation twins); rows
// are widened to f32 as they are loaded. Each kernel file declares the overrides these
// loads read (D_MULT4) with its own defaults.

struct Params {
    heads: u32,    // H
    tq: u32,
    tk: u32,
    d: u32,        // head dim (<= 512)
    kps: u32,      // keys per split
    splits: u32,
    bh0: u32,      // first batch*head of this dispatch
    scale: f32,
    q_sb: u32, q_sh: u32, q_st: u32,   // q strides: batch, head, token
    k_sb: u32, k_sh: u32, k_st: u32,   // k and v strides
    o_sb: u32, o_sh: u32, o_st: u32,   // output strides
    bh: u32,       // B*H (attn_combine)
    q_off: u32, k_off: u32, v_off: u32,   // element offsets of q, k and v in their buffers
    _pad0: u32, _pad1: u32, _pad2: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
// attn: out [.., Tq, D] by o strides, or the split partials [B*H*Tq, splits, D] when SPLIT.
// attn_combine: the final output.
@group(0) @binding(1) var<storage, read_write> o: array<elem>;
// (m, l) per query and split: [B*H*Tq, splits, 2] (SPLIT only); without splits and with
// LSE, the log-sum-exp per query [B*H*Tq].
@group(0) @binding(2) var<storage, read_write> ml: array<f32>;
// attn: q by q strides from q_off; attn_combine: the split partials.
@group(0) @binding(3) var<storage, read> q: array<elem>;
@group(0) @binding(4) var<storage, read> k: array<elem>;         // by k strides from k_off
@group(0) @binding(5) var<storage, read> v: array<elem>;         // by k strides from v_off
// The same k and v buffers viewed as vec4 (used when D_MULT4: one load per 4 values, which
// matters on CPU Vulkan where every load instruction is a loop over the SIMD lanes).
@group(0) @binding(6) var<storage, read> k4: array<vec4<elem>>;
@group(0) @binding(7) var<storage, read> v4: array<vec4<elem>>;

const DMAX4: u32 = 128u;         // 512 / 4
const NEG_BIG: f32 = -3.4028234663852886e38;

// Four values of a row starting at `base` (k and v: relative to k_off and v_off), from dim
// 4c; dims past D read as 0.
fn ld4q(base: u32, c: u32) -> vec4<f32> {
    let i = row4_at(base, c);
    return row4_mask(c, vec4<f32>(f32(q[i.x]), f32(q[i.y]), f32(q[i.z]), f32(q[i.w])));
}
fn ld4k(rel: u32, c: u32) -> vec4<f32> {
    let base = rel + p.k_off;
    if D_MULT4 {
        return vec4<f32>(k4[base / 4u + c]);
    }
    let i = row4_at(base, c);
    return row4_mask(c, vec4<f32>(f32(k[i.x]), f32(k[i.y]), f32(k[i.z]), f32(k[i.w])));
}
fn ld4v(rel: u32, c: u32) -> vec4<f32> {
    let base = rel + p.v_off;
    if D_MULT4 {
        return vec4<f32>(v4[base / 4u + c]);
    }
    let i = row4_at(base, c);
    return row4_mask(c, vec4<f32>(f32(v[i.x]), f32(v[i.y]), f32(v[i.z]), f32(v[i.w])));
}

