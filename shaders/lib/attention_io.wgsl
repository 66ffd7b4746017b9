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


// Query qi of (b, h), pre-scaled, into qv, and a zero accumulator. Both are private arrays
// of up to 512 values; loops over D have the constant bound D4 so that compilers can
// unroll them and keep the arrays in registers.
fn start_query(b: u32, h: u32, qi: u32, qv: ptr<function, array<vec4<f32>, DMAX4>>,
               acc: ptr<function, array<vec4<f32>, DMAX4>>) {
    let qbase = p.q_off + b * p.q_sb + h * p.q_sh + qi * p.q_st;
    for (var c = 0u; c < D4; c++) {
        (*qv)[c] = ld4q(qbase, c) * p.scale;
        (*acc)[c] = vec4<f32>(0.0);
    }
}

// Keys [x, y) of split `split` for the workgroup of WGQ queries from q0; with a causal
// mask the workgroup's last query bounds them (each lane masks the keys past its own).
fn split_keys(split: u32, q0: u32) -> vec2<u32> {
    let j0 = split * p.kps;
    var j1 = min(j0 + p.kps, p.tk);
    if CAUSAL {
        j1 = min(j1, min(q0 + WGQ, p.tq));
    }
    return vec2<u32>(j0, j1);
}

// Writes query i of (b, h) (row bh * Tq + i): with SPLIT the unnormalised accumulator and
// (m, l) of split `split`, else the output acc / l and, with LSE, L = m + log(l).
fn finish_query(bh: u32, b: u32, h: u32, i: u32, split: u32, m: f32, l: f32,
                acc: ptr<function, array<vec4<f32>, DMAX4>>) {
    var ob: u32;
    var r = 1.0;
    if SPLIT {
        let slot = (bh * p.tq + i) * p.splits + split;
        ml[2u * slot] = m;
        ml[2u * slot + 1u] = l;
        ob = slot * p.d;
    } else {
        if LSE {
            ml[bh * p.tq + i] = m + log(l);
        }
        r = 1.0 / l;
        ob = b * p.o_sb + h * p.o_sh + i * p.o_st;
    }
    for (var c = 0u; c < D4; c++) {
        let a = (*acc)[c] * r;
        for (var t = 0u; t < 4u; t++) {
            if 4u * c + t < p.d {
                o[ob + 4u * c + t] = elem(a[t]);
            }
        }
    }
}
