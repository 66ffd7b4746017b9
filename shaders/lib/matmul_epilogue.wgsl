// Shared by shaders/matmul.wgsl and shaders/matmul_subgroup.wgsl (prefixed to both, after
// act.wgsl): the params struct, the epilogue bindings and overrides, and the fused store
//   C[b] = act(alpha * acc [+ C[b] when accumulating a split of K] + bias) + res[b]
// Each kernel file declares its own views of A (binding 1) and B (binding 2).

struct Params {
    m: u32,
    n: u32,
    k: u32,
    batch: u32,
    stride_a: u32,
    stride_b: u32,
    stride_c: u32,
    row0: u32,     // first output row of this dispatch (large M is split)
    batch0: u32,   // first batch entry of this dispatch (large batch is split)
    alpha: f32,
    k0: u32,       // this dispatch sums k in [k0, k1): long K is split so that one
    k1: u32,       // invocation's loops stay under llvmpipe's cap (ops::CPU_LOOP_LIMIT)
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(3) var<storage, read> bias: array<f32>;       // [N] (read only if HAS_BIAS)
// The residual and C are `elem` like A (f32, or f16 activations: see shaders/lib/elem_f32.wgsl).
@group(0) @binding(4) var<storage, read> res: array<elem>;       // [batch, M, N] (read only if HAS_RES)
@group(0) @binding(5) var<storage, read_write> c: array<elem>;   // [batch, M, N]

override TRANS_A: bool = false;
override TRANS_B: bool = false;
override HAS_BIAS: bool = false;
override HAS_RES: bool = false;
override ACT: u32 = 0u;
// Split K: ACCUMULATE adds to the partial sum already in C; EPILOGUE (the last split) applies
// bias, activation and residual. A single dispatch has ACCUMULATE = false, EPILOGUE = true.
override ACCUMULATE: bool = false;
override EPILOGUE: bool = true;

fn store(bi: u32, i: u32, j: u32, v: f32) {
    let o = bi * p.stride_c + i * p.n + j;
    var x = p.alpha * v;
    if ACCUMULATE {
        x += f32(c[o]);
    }
    if EPILOGUE {
        if HAS_BIAS {
            x += bias[j];
        }
        x = apply_act(ACT, x);
        if HAS_RES {
            x += f32(res[o]);
        }
    }
    c[o] = elem(x);
}

fn store_tile(bi: u32, row: u32, col: u32, acc: array<vec4<f32>, 4>) {
    for (var r = 0u; r < 4u; r++) {
        let i = row + r;
        if i < p.m {
            let v = acc[r];
            if col < p.n { store(bi, i, col, v.x); }
            if col + 1u < p.n { store(bi, i, col + 1u, v.y); }
            if col + 2u < p.n { store(bi, i, col + 2u, v.z); }
            if col + 3u < p.n { store(bi, i, col + 3u, v.w); }
        }
    }
}

// ARGMIN: instead of C, per row of C and block of columns the lowest value of
// alpha * acc + bias (no activation, residual or split K: the host checks) and its column,
// lowest column on ties, as the pair (value, column's bits) at
// c[2 * ((b * M + i) * blocks + block)]. A block with no column under N (or only NaN) holds
// (+inf, 0xffffffff). Each kernel decides which columns make a block; the pairs' reduction
// (vq.wgsl's nearest_reduce) compares values, then columns, so blocks may interleave.
override ARGMIN: bool = false;

struct ArgMin {
    v: f32,
    col: u32,
}

fn argmin_none() -> ArgMin {
    return ArgMin(bitcast<f32>(0x7f800000u), 0xffffffffu);
}

// `r` with columns col .. col + 3 (values `v` before the epilogue) folded in.
fn argmin_fold(r: ArgMin, col: u32, v: vec4<f32>) -> ArgMin {
    var out = r;
    for (var j = 0u; j < 4u; j++) {
        let cj = col + j;
        if cj < p.n {
            var x = p.alpha * v[j];
            if HAS_BIAS {
                x += bias[cj];
            }
            out = argmin_pick(out, ArgMin(x, cj));
        }
    }
    return out;
}

// The better of two candidates: the lower value, then the lower column (NaN never wins).
fn argmin_pick(a: ArgMin, b: ArgMin) -> ArgMin {
    if b.v < a.v || (b.v == a.v && b.col < a.col) {
        return b;
    }
    return a;
}

fn argmin_put(bi: u32, i: u32, blocks: u32, block: u32, r: ArgMin) {
    let o = 2u * ((bi * p.m + i) * blocks + block);
    // f32 C only (the host refuses ARGMIN with f16 activations): elem is f32 here.
    c[o] = elem(r.v);
    c[o + 1u] = elem(bitcast<f32>(r.col));
}
