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
// The same A viewed as vec4 (matmul_coop4 only; no entry point uses both views).
@group(0) @binding(1) var<storage, read> a4: array<vec4<elem>>;
// B (binding 2) is shaders/lib/matmul_b_f16.wgsl's `b`, or its vec4 view `b4`.

override WG: u32 = 128u;

const BM: u32 = 4u * S;
const BN: u32 = 4u * S;
const BK: u32 = 2u * S;

var<workgroup> ta: array<f16, BM * BK>;   // [BM][BK]: ta[i * BK + kk]
// [BK][BN]: tb[kk * BN + j] (matmul_coop), or [BN][BK]: tb[j * BK + kk] (matmul_coop4)
var<workgroup> tb: array<f16, BK * BN>;
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

// The accumulators of one subgroup: its 2 × 2 block of S × S matrices.
struct Acc {
    c00: coop_c,
    c01: coop_c,
    c10: coop_c,
    c11: coop_c,
}

// Where a workgroup and subgroup work. No kernel returns early: every invocation reaches
// the barriers (the host dispatches exactly the batch entries there are).
struct Tile {
    bi: u32,      // batch entry
    row0: u32,    // the workgroup's first row and column of C
    col0: u32,
    owner: bool,  // this subgroup owns a block (subgroups past the fourth do not)
    sr: u32,      // its 2S × 2S block's first row and column within the tile
    sc: u32,
}

fn tile_of(wid: vec3<u32>, sg: u32) -> Tile {
    return Tile(wid.z + p.batch0, p.row0 + wid.y * BM, wid.x * BN, sg < 4u,
                (sg / 2u) % 2u * 2u * S, sg % 2u * 2u * S);
}

// acc plus the staged slice's products for the subgroup's block of tile t; `b_rows`: tb
// holds B as [BK][BN] (true) or [BN][BK].
fn slice_mma(acc: Acc, t: Tile, b_rows: bool) -> Acc {
    let sr = t.sr;
    let sc = t.sc;
    var r = acc;
    for (var kk = 0u; kk < BK; kk += S) {
        let a0 = coopLoadT<coop_a>(&ta[sr * BK + kk], BK);
        let a1 = coopLoadT<coop_a>(&ta[(sr + S) * BK + kk], BK);
        var b0: coop_b;
        var b1: coop_b;
        if b_rows {
            b0 = coopLoadT<coop_b>(&tb[kk * BN + sc], BN);
            b1 = coopLoadT<coop_b>(&tb[kk * BN + sc + S], BN);
        } else {
            // Column-major: B's element (kk, j) at tb[j * BK + kk].
            b0 = coopLoad<coop_b>(&tb[sc * BK + kk], BK);
            b1 = coopLoad<coop_b>(&tb[(sc + S) * BK + kk], BK);
        }
        r.c00 = coopMultiplyAdd(a0, b0, r.c00);
        r.c01 = coopMultiplyAdd(a0, b1, r.c01);
        r.c10 = coopMultiplyAdd(a1, b0, r.c10);
        r.c11 = coopMultiplyAdd(a1, b1, r.c11);
    }
    return r;
}

// Puts the owning subgroups' accumulators through tc into the fused store.
fn finish(acc: Acc, t: Tile, li: u32) {
    let sr = t.sr;
    let sc = t.sc;
    if t.owner {
        coopStoreT(acc.c00, &tc[sr * BN + sc], BN);
        coopStoreT(acc.c01, &tc[sr * BN + sc + S], BN);
        coopStoreT(acc.c10, &tc[(sr + S) * BN + sc], BN);
        coopStoreT(acc.c11, &tc[(sr + S) * BN + sc + S], BN);
    }
    workgroupBarrier();
    for (var e = li; e < BM * BN; e += WG) {
        let i = t.row0 + e / BN;
        let j = t.col0 + e % BN;
        if i < p.m && j < p.n {
            store(t.bi, i, j, tc[e]);
        }
    }
}

fn acc_zero() -> Acc {
    return Acc(coop_c(), coop_c(), coop_c(), coop_c());
}

@compute @workgroup_size(WG, 1, 1)
fn matmul_coop(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(local_invocation_index) li: u32,
    @builtin(subgroup_id) sg: u32,
) {
    let t = tile_of(wid, sg);
    let ba = t.bi * p.stride_a;
    let bb = t.bi * p.stride_b;
    var acc = acc_zero();
    for (var k0 = p.k0; k0 < p.k1; k0 += BK) {
        for (var e = li; e < BM * BK; e += WG) {
            ta[e] = a_f16(ba, t.row0 + e / BK, k0 + e % BK, p.k1);
        }
        for (var e = li; e < BK * BN; e += WG) {
            tb[e] = b_f16(bb, k0 + e / BN, t.col0 + e % BN, p.k1);
        }
        workgroupBarrier();
        if t.owner {
            acc = slice_mma(acc, t, true);
        }
        workgroupBarrier();
    }
    finish(acc, t, li);
}

// matmul_coop for the linear-layer case: A row-major and B stored [N, K] (TRANS_B), K a
// multiple of 4 (the host checks). Both operands are contiguous along K, so each staging
// step moves 4 k with one vec4 load (4 times fewer loads than matmul_coop's), and B is
// staged as [BN][BK] and read back column-major.
@compute @workgroup_size(WG, 1, 1)
fn matmul_coop4(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(local_invocation_index) li: u32,
    @builtin(subgroup_id) sg: u32,
) {
    let t = tile_of(wid, sg);
    let k4 = p.k / 4u;
    let ba = t.bi * p.stride_a / 4u;
    let bb = t.bi * p.stride_b / 4u;
    var acc = acc_zero();
    const Q: u32 = BK / 4u;   // vec4 per staged row
    for (var k0 = p.k0; k0 < p.k1; k0 += BK) {
        for (var e = li; e < BM * Q; e += WG) {
            let i = e / Q;
            let kq = k0 / 4u + e % Q;
            var v = vec4<f16>(0.0);
            if t.row0 + i < p.m && 4u * kq < p.k1 {
                v = vec4<f16>(a4[ba + (t.row0 + i) * k4 + kq]);
            }
            let o = i * BK + 4u * (e % Q);
            ta[o] = v.x;
            ta[o + 1u] = v.y;
            ta[o + 2u] = v.z;
            ta[o + 3u] = v.w;
        }
        for (var e = li; e < BN * Q; e += WG) {
            let j = e / Q;
            let kq = k0 / 4u + e % Q;
            var v = vec4<f16>(0.0);
            if t.col0 + j < p.n && 4u * kq < p.k1 {
                v = b4[bb + (t.col0 + j) * k4 + kq];
            }
            let o = j * BK + 4u * (e % Q);
            tb[o] = v.x;
            tb[o + 1u] = v.y;
            tb[o + 2u] = v.z;
            tb[o + 3u] = v.w;
        }
        workgroupBarrier();
        if t.owner {
            acc = slice_mma(acc, t, false);
        }
        workgroupBarrier();
    }
    finish(acc, t, li);
}
