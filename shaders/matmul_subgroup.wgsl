// Matmul variant for CPU Vulkan (lavapipe) built on subgroup broadcasts; same contract,
// params and epilogue as shaders/matmul.wgsl (see shaders/lib/matmul_epilogue.wgsl). Its
// own module because subgroup operations need the SUBGROUP feature.
//
// lavapipe runs a subgroup as the 8 SIMD lanes of one CPU thread and every storage load as
// a loop over those lanes, so load instructions are what costs. Here a subgroup of 8 lanes
// computes an 8 x 32 block of C: each lane owns 4 columns and all 8 rows. Per 4 steps of K,
// the 8 lanes load the 8 x 4 block of A with one vec4 load (one row, or half a 4 x 4 tile
// if TRANS_A, per lane) and hand it to each other with subgroupBroadcast (a register
// shuffle), and each lane loads its own 4 x 4 block of B with four vec4 loads: 5 loads for
// 128 FMAs per lane, against 8 for 64 in matmul_vec4.
//
// With SG_ROWS = 16 a subgroup computes 16 x 32: each lane loads two rows of A (or both
// halves of two 4 x 4 tiles), so the same 4 loads of B feed twice the FMAs: 6 loads for
// 256 FMAs per lane, at the price of 16 vec4 accumulators (which spill on AVX2 but not on
// AVX-512's 32 registers).
//
// Requires subgroups of exactly 8 invocations (the host checks the adapter's subgroup size
// range), K % 4 == 0, M % 4 == 0 if TRANS_A, N % 4 == 0 unless TRANS_B. A workgroup of 64
// invocations covers SG_STACK * SG_ROWS rows x (8 / SG_STACK) * 32 columns; tile
// coordinates come from subgroup_id
// and subgroup_invocation_id, so any packing of invocations into subgroups gives right
// results.

// Rows of C per subgroup: 8 or 16 (32, as a loop over groups of 8, measured slower: the
// accumulators no longer fit in registers).
override SG_ROWS: u32 = 8u;
// Subgroups stacked along M in a workgroup (1, 2, 4 or 8); the other 8 / SG_STACK sit side
// by side along N. A product with few rows (50 tokens) stacks fewer, so that no subgroup
// computes rows past M while 16-row tiles still cover them.
override SG_STACK: u32 = 8u;

@group(0) @binding(1) var<storage, read> a4: array<vec4<f32>>;   // [batch, M, K] ([.., K, M] if TRANS_A), as vec4
@group(0) @binding(2) var<storage, read> b4: array<vec4<f32>>;   // [batch, K, N] ([.., N, K] if TRANS_B), as vec4

fn fma_row(a: vec4<f32>, bk: mat4x4<f32>, acc: vec4<f32>) -> vec4<f32> {
    return fma(vec4<f32>(a.x), bk[0], fma(vec4<f32>(a.y), bk[1],
           fma(vec4<f32>(a.z), bk[2], fma(vec4<f32>(a.w), bk[3], acc))));
}

// What this lane loads of A for row group g (rows row + 8g ..): row `row + 8g + lane`, or
// (TRANS_A) rows row + 8g + 4h .. + 3 at step kk = lane % 4 of each K quad, h = lane / 4.
fn load_a(ba: u32, row: u32, g: u32, lane: u32, kq: u32) -> vec4<f32> {
    if TRANS_A {
        let blk = min(row + 8u * g + 4u * (lane / 4u), p.m - 4u) / 4u;
        return a4[ba + (4u * kq + lane % 4u) * (p.m / 4u) + blk];
    }
    return a4[ba + min(row + 8u * g + lane, p.m - 1u) * (p.k / 4u) + kq];
}

// acc[8g + r] += (row 8g + r's 4 k) · bk for the 8 rows of group g, from the lanes' loads.
fn group_step(mine: vec4<f32>, bk: mat4x4<f32>, g: u32, acc: ptr<function, array<vec4<f32>, 32>>) {
    var lo = mat4x4<f32>(subgroupBroadcast(mine, 0u), subgroupBroadcast(mine, 1u),
                         subgroupBroadcast(mine, 2u), subgroupBroadcast(mine, 3u));
    var hi = mat4x4<f32>(subgroupBroadcast(mine, 4u), subgroupBroadcast(mine, 5u),
                         subgroupBroadcast(mine, 6u), subgroupBroadcast(mine, 7u));
    if TRANS_A {
        lo = transpose(lo);
        hi = transpose(hi);
    }
    let o = 8u * g;
    (*acc)[o] = fma_row(lo[0], bk, (*acc)[o]);
    (*acc)[o + 1u] = fma_row(lo[1], bk, (*acc)[o + 1u]);
    (*acc)[o + 2u] = fma_row(lo[2], bk, (*acc)[o + 2u]);
    (*acc)[o + 3u] = fma_row(lo[3], bk, (*acc)[o + 3u]);
    (*acc)[o + 4u] = fma_row(hi[0], bk, (*acc)[o + 4u]);
    (*acc)[o + 5u] = fma_row(hi[1], bk, (*acc)[o + 5u]);
    (*acc)[o + 6u] = fma_row(hi[2], bk, (*acc)[o + 6u]);
    (*acc)[o + 7u] = fma_row(hi[3], bk, (*acc)[o + 7u]);
}

fn store_group(bi: u32, row: u32, col: u32, g: u32, acc: ptr<function, array<vec4<f32>, 32>>) {
    let o = 8u * g;
    store_tile(bi, row + o, col, array<vec4<f32>, 4>((*acc)[o], (*acc)[o + 1u], (*acc)[o + 2u], (*acc)[o + 3u]));
    store_tile(bi, row + o + 4u, col, array<vec4<f32>, 4>((*acc)[o + 4u], (*acc)[o + 5u], (*acc)[o + 6u], (*acc)[o + 7u]));
}

@compute @workgroup_size(64)
fn matmul_subgroup(@builtin(workgroup_id) wid: vec3<u32>, @builtin(subgroup_id) sid: u32,
                   @builtin(subgroup_invocation_id) lane: u32) {
    // No early exit: every lane takes part in the broadcasts. Out-of-range lanes read
    // clamped addresses and store nothing.
    let bi = min(wid.z + p.batch0, p.batch - 1u);
    let row = p.row0 + (wid.y * SG_STACK + sid % SG_STACK) * SG_ROWS;
    let col = ((wid.x * (8u / SG_STACK) + sid / SG_STACK) * 8u + lane) * 4u;
    let ba = bi * p.stride_a / 4u;
    let bb = bi * p.stride_b / 4u;
    let k4 = p.k / 4u;
    let n4 = p.n / 4u;
    let cl = min(vec4<u32>(col, col + 1u, col + 2u, col + 3u), vec4<u32>(p.n - 1u));
    let cv = min(col, p.n - 4u) / 4u;
    var acc: array<vec4<f32>, 32>;
    for (var kq = p.k0 / 4u; kq < p.k1 / 4u; kq++) {
        var bk: mat4x4<f32>;   // rows over kk of this lane's 4 columns
        if TRANS_B {
            bk = transpose(mat4x4<f32>(b4[bb + cl.x * k4 + kq], b4[bb + cl.y * k4 + kq],
                                       b4[bb + cl.z * k4 + kq], b4[bb + cl.w * k4 + kq]));
        } else {
            let o = bb + 4u * kq * n4 + cv;
            bk = mat4x4<f32>(b4[o], b4[o + n4], b4[o + 2u * n4], b4[o + 3u * n4]);
        }
        // Constant group numbers only: a dynamic index would keep acc in memory.
        group_step(load_a(ba, row, 0u, lane, kq), bk, 0u, &acc);
        if SG_ROWS >= 16u {
            group_step(load_a(ba, row, 1u, lane, kq), bk, 1u, &acc);
        }
        if SG_ROWS == 32u {
            group_step(load_a(ba, row, 2u, lane, kq), bk, 2u, &acc);
            group_step(load_a(ba, row, 3u, lane, kq), bk, 3u, &acc);
        }
    }
    if wid.z + p.batch0 < p.batch && row < p.m && col < p.n {
        store_group(bi, row, col, 0u, &acc);
        if SG_ROWS >= 16u {
            store_group(bi, row, col, 1u, &acc);
        }
        if SG_ROWS == 32u {
            store_group(bi, row, col, 2u, &acc);
            store_group(bi, row, col, 3u, &acc);
        }
    }
}
