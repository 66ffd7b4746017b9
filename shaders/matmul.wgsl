// Batched matrix multiply with a fused epilogue:
//   C[b] = act(alpha * op(A[b]) @ op(B[b]) + bias) + res[b]
// op() transposes when TRANS_A / TRANS_B is set. A batch stride of 0 broadcasts an operand
// (one weight matrix for every batch entry).
//
// Two variants of the same contract:
//   matmul_reg    4x4 outputs per invocation held in registers, no workgroup memory and no
//                 barriers: best where barriers are expensive (CPU Vulkan such as lavapipe).
//   matmul_shared 64x64 tile per workgroup staged through workgroup memory, BK = 16:
//                 best on GPUs.

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
@group(0) @binding(1) var<storage, read> a: array<f32>;          // [batch, M, K], [batch, K, M] if TRANS_A
@group(0) @binding(2) var<storage, read> b: array<f32>;          // [batch, K, N], [batch, N, K] if TRANS_B
@group(0) @binding(3) var<storage, read> bias: array<f32>;       // [N] (read only if HAS_BIAS)
@group(0) @binding(4) var<storage, read> res: array<f32>;        // [batch, M, N] (read only if HAS_RES)
@group(0) @binding(5) var<storage, read_write> c: array<f32>;    // [batch, M, N]

override TRANS_A: bool = false;
override TRANS_B: bool = false;
override HAS_BIAS: bool = false;
override HAS_RES: bool = false;
override ACT: u32 = 0u;
// Split K: ACCUMULATE adds to the partial sum already in C; EPILOGUE (the last split) applies
// bias, activation and residual. A single dispatch has ACCUMULATE = false, EPILOGUE = true.
override ACCUMULATE: bool = false;
override EPILOGUE: bool = true;

fn a_at(base: u32, i: u32, kk: u32) -> f32 {
    if TRANS_A {
        return a[base + kk * p.m + i];
    }
    return a[base + i * p.k + kk];
}

fn b_at(base: u32, kk: u32, j: u32) -> f32 {
    if TRANS_B {
        return b[base + j * p.k + kk];
    }
    return b[base + kk * p.n + j];
}

fn store(bi: u32, i: u32, j: u32, v: f32) {
    let o = bi * p.stride_c + i * p.n + j;
    var x = p.alpha * v;
    if ACCUMULATE {
        x += c[o];
    }
    if EPILOGUE {
        if HAS_BIAS {
            x += bias[j];
        }
        x = apply_act(ACT, x);
        if HAS_RES {
            x += res[o];
        }
    }
    c[o] = x;
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

@compute @workgroup_size(8, 8, 1)
fn matmul_reg(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let bi = wid.z + p.batch0;
    let row = p.row0 + (wid.y * 8u + lid.y) * 4u;
    let col = (wid.x * 8u + lid.x) * 4u;
    if row >= p.m || col >= p.n || bi >= p.batch {
        return;
    }
    let ba = bi * p.stride_a;
    let bb = bi * p.stride_b;
    // Rows/cols past the edge read a valid neighbour instead of branching in the inner loop;
    // their results are never stored.
    let r1 = min(row + 1u, p.m - 1u);
    let r2 = min(row + 2u, p.m - 1u);
    let r3 = min(row + 3u, p.m - 1u);
    let c1 = min(col + 1u, p.n - 1u);
    let c2 = min(col + 2u, p.n - 1u);
    let c3 = min(col + 3u, p.n - 1u);
    var acc: array<vec4<f32>, 4>;
    for (var kk = p.k0; kk < p.k1; kk++) {
        let av = vec4<f32>(a_at(ba, row, kk), a_at(ba, r1, kk), a_at(ba, r2, kk), a_at(ba, r3, kk));
        let bv = vec4<f32>(b_at(bb, kk, col), b_at(bb, kk, c1), b_at(bb, kk, c2), b_at(bb, kk, c3));
        acc[0] = fma(vec4<f32>(av.x), bv, acc[0]);
        acc[1] = fma(vec4<f32>(av.y), bv, acc[1]);
        acc[2] = fma(vec4<f32>(av.z), bv, acc[2]);
        acc[3] = fma(vec4<f32>(av.w), bv, acc[3]);
    }
    store_tile(bi, row, col, acc);
}

const TILE: u32 = 64u;
const BK: u32 = 16u;
var<workgroup> ta: array<f32, 1024>;   // [BK][TILE]: ta[kk * TILE + i]
var<workgroup> tb: array<f32, 1024>;   // [BK][TILE]: tb[kk * TILE + j]

@compute @workgroup_size(16, 16, 1)
fn matmul_shared(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(local_invocation_id) lid: vec3<u32>,
    @builtin(local_invocation_index) li: u32,
) {
    let bi = min(wid.z + p.batch0, p.batch - 1u);
    let row_base = p.row0 + wid.y * TILE;
    let col_base = wid.x * TILE;
    let ba = bi * p.stride_a;
    let bb = bi * p.stride_b;
    var acc: array<vec4<f32>, 4>;
    for (var k0 = p.k0; k0 < p.k1; k0 += BK) {
        for (var l = 0u; l < 4u; l++) {
            let e = li + l * 256u;
            // Consecutive invocations walk the operand's contiguous axis.
            var i: u32;
            var kk: u32;
            if TRANS_A {
                kk = e / TILE;
                i = e % TILE;
            } else {
                i = e / BK;
                kk = e % BK;
            }
            let gi = row_base + i;
            let gk = k0 + kk;
            var v = 0.0;
            if gi < p.m && gk < p.k1 {
                v = a_at(ba, gi, gk);
            }
            ta[kk * TILE + i] = v;

            var j: u32;
            var kb: u32;
            if TRANS_B {
                j = e / BK;
                kb = e % BK;
            } else {
                kb = e / TILE;
                j = e % TILE;
            }
            let gj = col_base + j;
            let gkb = k0 + kb;
            var w = 0.0;
            if gj < p.n && gkb < p.k1 {
                w = b_at(bb, gkb, gj);
            }
            tb[kb * TILE + j] = w;
        }
        workgroupBarrier();
        for (var kk = 0u; kk < BK; kk++) {
            let ar = kk * TILE + lid.y * 4u;
            let bc = kk * TILE + lid.x * 4u;
            let av = vec4<f32>(ta[ar], ta[ar + 1u], ta[ar + 2u], ta[ar + 3u]);
            let bv = vec4<f32>(tb[bc], tb[bc + 1u], tb[bc + 2u], tb[bc + 3u]);
            acc[0] = fma(vec4<f32>(av.x), bv, acc[0]);
            acc[1] = fma(vec4<f32>(av.y), bv, acc[1]);
            acc[2] = fma(vec4<f32>(av.z), bv, acc[2]);
            acc[3] = fma(vec4<f32>(av.w), bv, acc[3]);
        }
        workgroupBarrier();
    }
    if wid.z + p.batch0 < p.batch {
        store_tile(bi, row_base + lid.y * 4u, col_base + lid.x * 4u, acc);
    }
}
