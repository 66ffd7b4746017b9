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
// invocations covers 8 * SG_ROWS rows x 32 columns; tile coordinates come from subgroup_id
// and subgroup_invocation_id, so any packing of invocations into subgroups gives right
// results.

// Rows of C per subgroup: 8 or 16 (32, as a loop over groups of 8, measured slower: the
// accumulators no longer fit in registers).
override SG_ROWS: u32 = 8u;

@group(0) @binding(1) var<storage, read> a4: array<vec4<f32>>;   // [batch, M, K] ([.., K, M] if TRANS_A), as vec4
@group(0) @binding(2) var<storage, read> b4: array<vec4<f32>>;   // [batch, K, N] ([.., N, K] if TRANS_B), as vec4

fn fma_row(a: vec4<f32>, bk: mat4x4<f32>, acc: vec4<f32>) -> vec4<f32> {
    return fma(vec4<f32>(a.x), bk[0], fma(vec4<f32>(a.y), bk[1],
           fma(vec4<f32>(a.z), bk[2], fma(vec4<f32>(a.w), bk[3], acc))));
}

@compute @workgroup_size(64)
fn matmul_subgroup(@builtin(workgroup_id) wid: vec3<u32>, @builtin(subgroup_id) sid: u32,
                   @builtin(subgroup_invocation_id) lane: u32) {
    // No early exit: every lane takes part in the broadcasts. Out-of-range lanes read
    // clamped addresses and store nothing.
    let bi = min(wid.z + p.batch0, p.batch - 1u);
    let row = p.row0 + (wid.y * 8u + sid) * SG_ROWS;
    let col = (wid.x * 8u + lane) * 4u;
    let ba = bi * p.stride_a / 4u;
    let bb = bi * p.stride_b / 4u;
    let k4 = p.k / 4u;
    let m4 = p.m / 4u;
    let n4 = p.n / 4u;
    let tall = SG_ROWS == 16u;
    // What this lane loads of A: rows `row + lane` (and `row + 8 + lane`), or (TRANS_A)
    // rows row + 4h .. + 3 (and row + 8 + 4h ..) at step kk = lane % 4 of each K quad,
    // h = lane / 4.
    let a_row = min(row + lane, p.m - 1u);
    let a_row2 = min(row + 8u + lane, p.m - 1u);
    let a_blk = min(row + 4u * (lane / 4u), p.m - 4u) / 4u;
    let a_blk2 = min(row + 8u + 4u * (lane / 4u), p.m - 4u) / 4u;
    let a_kk = lane % 4u;
    let cl = min(vec4<u32>(col, col + 1u, col + 2u, col + 3u), vec4<u32>(p.n - 1u));
    let cv = min(col, p.n - 4u) / 4u;
    var acc0 = vec4<f32>(0.0);
    var acc1 = vec4<f32>(0.0);
    var acc2 = vec4<f32>(0.0);
    var acc3 = vec4<f32>(0.0);
    var acc4 = vec4<f32>(0.0);
    var acc5 = vec4<f32>(0.0);
    var acc6 = vec4<f32>(0.0);
    var acc7 = vec4<f32>(0.0);
    var acc8 = vec4<f32>(0.0);
    var acc9 = vec4<f32>(0.0);
    var acc10 = vec4<f32>(0.0);
    var acc11 = vec4<f32>(0.0);
    var acc12 = vec4<f32>(0.0);
    var acc13 = vec4<f32>(0.0);
    var acc14 = vec4<f32>(0.0);
    var acc15 = vec4<f32>(0.0);
    for (var kq = p.k0 / 4u; kq < p.k1 / 4u; kq++) {
        var mine: vec4<f32>;
        var mine2 = vec4<f32>(0.0);
        if TRANS_A {
            mine = a4[ba + (4u * kq + a_kk) * m4 + a_blk];
            if tall {
                mine2 = a4[ba + (4u * kq + a_kk) * m4 + a_blk2];
            }
        } else {
            mine = a4[ba + a_row * k4 + kq];
            if tall {
                mine2 = a4[ba + a_row2 * k4 + kq];
            }
        }
        var bk: mat4x4<f32>;   // rows over kk of this lane's 4 columns
        if TRANS_B {
            bk = transpose(mat4x4<f32>(b4[bb + cl.x * k4 + kq], b4[bb + cl.y * k4 + kq],
                                       b4[bb + cl.z * k4 + kq], b4[bb + cl.w * k4 + kq]));
        } else {
            let o = bb + 4u * kq * n4 + cv;
            bk = mat4x4<f32>(b4[o], b4[o + n4], b4[o + 2u * n4], b4[o + 3u * n4]);
        }
        // Rows of A over kk: lane r's load, or (TRANS_A) 4 x 4 tiles held as columns over
        // rows, transposed.
        var lo = mat4x4<f32>(subgroupBroadcast(mine, 0u), subgroupBroadcast(mine, 1u),
                             subgroupBroadcast(mine, 2u), subgroupBroadcast(mine, 3u));
        var hi = mat4x4<f32>(subgroupBroadcast(mine, 4u), subgroupBroadcast(mine, 5u),
                             subgroupBroadcast(mine, 6u), subgroupBroadcast(mine, 7u));
        if TRANS_A {
            lo = transpose(lo);
            hi = transpose(hi);
        }
        acc0 = fma_row(lo[0], bk, acc0);
        acc1 = fma_row(lo[1], bk, acc1);
        acc2 = fma_row(lo[2], bk, acc2);
        acc3 = fma_row(lo[3], bk, acc3);
        acc4 = fma_row(hi[0], bk, acc4);
        acc5 = fma_row(hi[1], bk, acc5);
        acc6 = fma_row(hi[2], bk, acc6);
        acc7 = fma_row(hi[3], bk, acc7);
        if tall {
            var lo2 = mat4x4<f32>(subgroupBroadcast(mine2, 0u), subgroupBroadcast(mine2, 1u),
                                  subgroupBroadcast(mine2, 2u), subgroupBroadcast(mine2, 3u));
            var hi2 = mat4x4<f32>(subgroupBroadcast(mine2, 4u), subgroupBroadcast(mine2, 5u),
                                  subgroupBroadcast(mine2, 6u), subgroupBroadcast(mine2, 7u));
            if TRANS_A {
                lo2 = transpose(lo2);
                hi2 = transpose(hi2);
            }
            acc8 = fma_row(lo2[0], bk, acc8);
            acc9 = fma_row(lo2[1], bk, acc9);
            acc10 = fma_row(lo2[2], bk, acc10);
            acc11 = fma_row(lo2[3], bk, acc11);
            acc12 = fma_row(hi2[0], bk, acc12);
            acc13 = fma_row(hi2[1], bk, acc13);
            acc14 = fma_row(hi2[2], bk, acc14);
            acc15 = fma_row(hi2[3], bk, acc15);
        }
    }
    if wid.z + p.batch0 < p.batch && row < p.m && col < p.n {
        store_tile(bi, row, col, array<vec4<f32>, 4>(acc0, acc1, acc2, acc3));
        store_tile(bi, row + 4u, col, array<vec4<f32>, 4>(acc4, acc5, acc6, acc7));
        if tall {
            store_tile(bi, row + 8u, col, array<vec4<f32>, 4>(acc8, acc9, acc10, acc11));
            store_tile(bi, row + 12u, col, array<vec4<f32>, 4>(acc12, acc13, acc14, acc15));
        }
    }
}
