// The matmul contract of shaders/matmul.wgsl (same params, bindings, epilogue and store:
// shaders/lib/matmul_epilogue.wgsl) on cooperative matrices (tensor cores), for f16
// products: f16 A (activations) and B (weights), f32 accumulation, f32 epilogue, f16 C.
// S×S×S multiply-adds of the adapter's configuration come from shaders/lib/coop16.wgsl
// (S = 16) or coop8.wgsl (S = 8), after shaders/lib/f16.wgsl and coop.wgsl.
//
// A workgroup computes a BM × BN = 4S × 4S tile of C (64 × 64 at S = 16). Its first four
// subgroups each own a 2 × 2 block of S × S accumulators (2S × 2S outputs); any further
// subgroups (a workgroup of WG = 4 × the adapter's largest subgroup holds more where the
// driver picks narrower ones) only help stage. Per slice of BK = 2S k, every invocation
// stages A's BM × BK and B's BK × BN block into workgroup memory as f16, zero-filled past
// M, N and the dispatch's K range (any shape, transpose or batch stride reads this way),
// then each owning subgroup runs 2 × 2 × 2 multiply-adds from there. At the end the
// accumulators go through workgroup memory to the epilogue, one output per invocation step.

@group(0) @binding(1) var<storage, read> a: array<elem>;         // [batch, M, K], [batch, K, M] if TRANS_A
// B (binding 2) is shaders/lib/matmul_b_f16.wgsl's `b`.

override WG: u32 = 128u;

const BM: u32 = 4u * S;
const BN: u32 = 4u * S;
const BK: u32 = 2u * S;

var<workgroup> ta: array<f16, BM * BK>;   // [BM][BK]: ta[i * BK + kk]
var<workgroup> tb: array<f16, BK * BN>;   // [BK][BN]: tb[kk * BN + j]
var<workgroup> tc: array<f32, BM * BN>;   // [BM][BN]: the accumulators, for the epilogue

// A[i, kk] of this batch entry (zero past M or the k range), as f16.
fn a_f16(base: u32, i: u32, kk: u32, k_end: u32) -> f16 {
    if i >= p.m || kk >= k_end {
        return f16(0.0);
    }
    if TRANS_A {
        return f16(a[base + kk * p.m + i]);
    }
    return f16(a[base + i * p.k + kk]);
}

// B[kk, j] of this batch entry (zero past N or the k range), as f16.
fn b_f16(base: u32, kk: u32, j: u32, k_end: u32) -> f16 {
    if j >= p.n || kk >= k_end {
        return f16(0.0);
    }
    if TRANS_B {
        return b[base + j * p.k + kk];
    }
    return b[base + kk * p.n + j];
}

@compute @workgroup_size(WG, 1, 1)
fn matmul_coop(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(local_invocation_index) li: u32,
    @builtin(subgroup_id) sg: u32,
) {
    // No early return: every invocation reaches the barriers. The host dispatches exactly
    // the batch entries there are.
    let bi = wid.z + p.batch0;
    let row0 = p.row0 + wid.y * BM;
    let col0 = wid.x * BN;
    let ba = bi * p.stride_a;
    let bb = bi * p.stride_b;
    // This subgroup's 2S × 2S block of the tile (subgroups past the fourth own none).
    let owner = sg < 4u;
    let sr = (sg / 2u) % 2u * 2u * S;
    let sc = sg % 2u * 2u * S;
    var c00 = coop_c();
    var c01 = coop_c();
    var c10 = coop_c();
    var c11 = coop_c();
    for (var k0 = p.k0; k0 < p.k1; k0 += BK) {
        for (var e = li; e < BM * BK; e += WG) {
            ta[e] = a_f16(ba, row0 + e / BK, k0 + e % BK, p.k1);
        }
        for (var e = li; e < BK * BN; e += WG) {
            tb[e] = b_f16(bb, k0 + e / BN, col0 + e % BN, p.k1);
        }
        workgroupBarrier();
        if owner {
            for (var kk = 0u; kk < BK; kk += S) {
                let a0 = coopLoadT<coop_a>(&ta[sr * BK + kk], BK);
                let a1 = coopLoadT<coop_a>(&ta[(sr + S) * BK + kk], BK);
                let b0 = coopLoadT<coop_b>(&tb[kk * BN + sc], BN);
                let b1 = coopLoadT<coop_b>(&tb[kk * BN + sc + S], BN);
                c00 = coopMultiplyAdd(a0, b0, c00);
                c01 = coopMultiplyAdd(a0, b1, c01);
                c10 = coopMultiplyAdd(a1, b0, c10);
                c11 = coopMultiplyAdd(a1, b1, c11);
            }
        }
        workgroupBarrier();
    }
    if owner {
        coopStoreT(c00, &tc[sr * BN + sc], BN);
        coopStoreT(c01, &tc[sr * BN + sc + S], BN);
        coopStoreT(c10, &tc[(sr + S) * BN + sc], BN);
        coopStoreT(c11, &tc[(sr + S) * BN + sc + S], BN);
    }
    workgroupBarrier();
    for (var e = li; e < BM * BN; e += WG) {
        let i = row0 + e / BN;
        let j = col0 + e % BN;
        if i < p.m && j < p.n {
            store(bi, i, j, tc[e]);
        }
    }
}
