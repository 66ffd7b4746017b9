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
// With SG_ROWS = 16 or 32 a subgroup computes 16 or 32 x 32: each lane loads 2 or 4 rows of
// A (or both halves of 4 x 4 tiles), so the same 4 loads of B feed 2 or 4 times the FMAs:
// 6 loads per 256 FMAs per lane at 16 rows, 8 per 512 at 32. The accumulators (16 or 32
// vec4, 4 SIMD registers each) spill on any CPU, but spills are plain vector moves while
// every storage load is a per-lane loop, so 32 rows win (1024²: 42-44 GFLOP/s against 31-33
// at 16 rows on lavapipe). WIDE (below) goes on to 32 x 128. The row groups are written once
// (group_step) and unrolled by constant group numbers: a loop over them indexed the
// accumulators dynamically, which kept them in memory and ran slower than 16 rows.
//
// Requires subgroups of exactly 8 invocations (the host checks the adapter's subgroup size
// range), K % 4 == 0, M % 4 == 0 if TRANS_A, N % 4 == 0 unless TRANS_B. A workgroup of 64
// invocations covers SG_STACK * SG_ROWS rows x (8 / SG_STACK) * 32 columns (128 with WIDE);
// tile coordinates come from subgroup_id and subgroup_invocation_id, so any packing of
// invocations into subgroups gives right results.

// Rows of C per subgroup: 8, 16 or 32.
override SG_ROWS: u32 = 8u;
// Subgroups stacked along M in a workgroup (1, 2, 4 or 8); the other 8 / SG_STACK sit side
// by side along N. A product with few rows (50 tokens) stacks fewer, so that no subgroup
// computes rows past M while 16- and 32-row tiles still cover them.
override SG_STACK: u32 = 8u;

@group(0) @binding(1) var<storage, read> a4: array<vec4<elem>>;  // [batch, M, K] ([.., K, M] if TRANS_A), as vec4 of elem (see matmul.wgsl)
// B ([batch, K, N], [.., N, K] if TRANS_B) is read with b4_load from
// shaders/lib/matmul_b_f32.wgsl, or matmul_b_f16.wgsl for the f16-weight twin.

// What this lane loads of A for row group g (rows row + 8g ..): row `row + 8g + lane`, or
// (TRANS_A) rows row + 8g + 4h .. + 3 at step kk = lane % 4 of each K quad, h = lane / 4.
fn load_a(ba: u32, row: u32, g: u32, lane: u32, kq: u32) -> vec4<f32> {
    if TRANS_A {
        let blk = min(row + 8u * g + 4u * (lane / 4u), p.m - 4u) / 4u;
        return vec4<f32>(a4[ba + (4u * kq + lane % 4u) * (p.m / 4u) + blk]);
    }
    return vec4<f32>(a4[ba + min(row + 8u * g + lane, p.m - 1u) * (p.k / 4u) + kq]);
}

// Rows 0..3 and 4..7 of a group over kk, from the lanes' loads of A (transposed back when
// each lane loaded a 4 x 4 tile, TRANS_A).
fn group_rows(mine: vec4<f32>) -> array<mat4x4<f32>, 2> {
    if TRANS_A {
        return array<mat4x4<f32>, 2>(transpose(rows_lo(mine)), transpose(rows_hi(mine)));
    }
    return array<mat4x4<f32>, 2>(rows_lo(mine), rows_hi(mine));
}

// Row group g (rows 8g ..) times this lane's columns: acc[8g + r].
fn group_step(mine: vec4<f32>, bk: mat4x4<f32>, g: u32, acc: ptr<function, array<vec4<f32>, 64>>) {
    let r = group_rows(mine);
    rows_fma(r[0], r[1], bk, 8u * g, acc);
}

// The same for WIDE's four column blocks: bk and bk2 into acc[8g + r] and acc[32 + 8g + r],
// bk3 and bk4 likewise into acc2.
fn group_step4(mine: vec4<f32>, bk: mat4x4<f32>, bk2: mat4x4<f32>, bk3: mat4x4<f32>,
               bk4: mat4x4<f32>, g: u32, acc: ptr<function, array<vec4<f32>, 64>>,
               acc2: ptr<function, array<vec4<f32>, 64>>) {
    let r = group_rows(mine);
    rows_fma(r[0], r[1], bk, 8u * g, acc);
    rows_fma(r[0], r[1], bk2, 32u + 8u * g, acc);
    rows_fma(r[0], r[1], bk3, 8u * g, acc2);
    rows_fma(r[0], r[1], bk4, 32u + 8u * g, acc2);
}

// 32 rows x 128 columns per subgroup (SG_ROWS must be 32): each lane owns four blocks of 4
// columns, 32 apart, so that every broadcast row of A feeds 16 columns: per 4 k and lane,
// 4 loads of A and 16 of B for 2048 FMAs (two blocks, 32 x 64, did 1024 FMAs for 12 loads:
// 1024² 50 against 54-55 GFLOP/s, 2048² 44 against 54 on lavapipe). Needs enough columns
// for many workgroups (large products).
override WIDE: bool = false;

fn load_b(bb: u32, col: u32, kq: u32) -> mat4x4<f32> {
    let k4 = p.k / 4u;
    let n4 = p.n / 4u;
    if TRANS_B {
        let cl = min(vec4<u32>(col, col + 1u, col + 2u, col + 3u), vec4<u32>(p.n - 1u));
        return transpose(mat4x4<f32>(b4_load(bb + cl.x * k4 + kq), b4_load(bb + cl.y * k4 + kq),
                                     b4_load(bb + cl.z * k4 + kq), b4_load(bb + cl.w * k4 + kq)));
    }
    let o = bb + 4u * kq * n4 + min(col, p.n - 4u) / 4u;
    return mat4x4<f32>(b4_load(o), b4_load(o + n4), b4_load(o + 2u * n4), b4_load(o + 3u * n4));
}

// Stores acc[a .. a + 8] as rows row .. row + 8 of columns col .. col + 3.
fn store_rows(bi: u32, row: u32, col: u32, a: u32, acc: ptr<function, array<vec4<f32>, 64>>) {
    store_tile(bi, row, col, array<vec4<f32>, 4>((*acc)[a], (*acc)[a + 1u], (*acc)[a + 2u], (*acc)[a + 3u]));
    store_tile(bi, row + 4u, col, array<vec4<f32>, 4>((*acc)[a + 4u], (*acc)[a + 5u], (*acc)[a + 6u], (*acc)[a + 7u]));
}

// Stores acc[a .. a + 32] as rows row .. row + 32 of columns col .. col + 3.
fn store_32rows(bi: u32, row: u32, col: u32, a: u32, acc: ptr<function, array<vec4<f32>, 64>>) {
    store_rows(bi, row, col, a, acc);
    store_rows(bi, row + 8u, col, a + 8u, acc);
    store_rows(bi, row + 16u, col, a + 16u, acc);
    store_rows(bi, row + 24u, col, a + 24u, acc);
}

// ARGMIN (see matmul_epilogue.wgsl): row i's minimum over the subgroup's columns (col's 4,
// and col2's with WIDE, whose subgroups hold two such blocks) is one block, 32 columns (64 with WIDE) wide. Every lane takes part
// in the subgroup minimum; lane 0 stores.
fn argmin_row(bi: u32, i: u32, lane: u32, col: u32, v: vec4<f32>, col2: u32, v2: vec4<f32>) {
    var r = argmin_fold(argmin_none(), col, v);
    var width = 32u;
    if WIDE {
        r = argmin_fold(r, col2, v2);
        width = 64u;
    }
    let mn = subgroupMin(r.v);
    let best = ArgMin(mn, subgroupMin(select(0xffffffffu, r.col, r.v == mn)));
    // Lane 0's col starts the block; a subgroup wholly past N has no block to write.
    if lane == 0u && i < p.m && col < p.n {
        argmin_put(bi, i, (p.n + width - 1u) / width, col / width, best);
    }
}

// argmin_row for rows row .. row + 7 from acc[a ..] (and acc[32 + a ..] with WIDE).
fn argmin_rows(bi: u32, row: u32, lane: u32, col: u32, col2: u32, a: u32, acc: ptr<function, array<vec4<f32>, 64>>) {
    argmin_row(bi, row, lane, col, (*acc)[a], col2, (*acc)[32u + a]);
    argmin_row(bi, row + 1u, lane, col, (*acc)[a + 1u], col2, (*acc)[33u + a]);
    argmin_row(bi, row + 2u, lane, col, (*acc)[a + 2u], col2, (*acc)[34u + a]);
    argmin_row(bi, row + 3u, lane, col, (*acc)[a + 3u], col2, (*acc)[35u + a]);
    argmin_row(bi, row + 4u, lane, col, (*acc)[a + 4u], col2, (*acc)[36u + a]);
    argmin_row(bi, row + 5u, lane, col, (*acc)[a + 5u], col2, (*acc)[37u + a]);
    argmin_row(bi, row + 6u, lane, col, (*acc)[a + 6u], col2, (*acc)[38u + a]);
    argmin_row(bi, row + 7u, lane, col, (*acc)[a + 7u], col2, (*acc)[39u + a]);
}

@compute @workgroup_size(64)
fn matmul_subgroup(@builtin(workgroup_id) wid: vec3<u32>, @builtin(subgroup_id) sid: u32,
                   @builtin(subgroup_invocation_id) lane: u32) {
    // Every lane of a subgroup takes part in its broadcasts: out-of-range lanes read
    // clamped addresses and store nothing. A subgroup whose rows all lie past M (the last
    // of 4 stacked 32-row subgroups for 77 text tokens) has nothing to compute or store and
    // leaves as a whole: `row` is the same on all of its lanes.
    let bi = min(wid.z + p.batch0, p.batch - 1u);
    let row = p.row0 + (wid.y * SG_STACK + sid % SG_STACK) * SG_ROWS;
    if row >= p.m {
        return;
    }
    let col = ((wid.x * (8u / SG_STACK) + sid / SG_STACK) * 8u + lane) * 4u;
    let ba = bi * p.stride_a / 4u;
    let bb = bi * p.stride_b / 4u;
    var acc: array<vec4<f32>, 64>;
    if WIDE {
        let colw = ((wid.x * (8u / SG_STACK) + sid / SG_STACK) * 32u + lane) * 4u;
        let col2 = colw + 32u;
        let col3 = colw + 64u;
        let col4 = colw + 96u;
        var acc2: array<vec4<f32>, 64>;
        for (var kq = p.k0 / 4u; kq < p.k1 / 4u; kq++) {
            let bk = load_b(bb, colw, kq);
            let bk2 = load_b(bb, col2, kq);
            let bk3 = load_b(bb, col3, kq);
            let bk4 = load_b(bb, col4, kq);
            group_step4(load_a(ba, row, 0u, lane, kq), bk, bk2, bk3, bk4, 0u, &acc, &acc2);
            group_step4(load_a(ba, row, 1u, lane, kq), bk, bk2, bk3, bk4, 1u, &acc, &acc2);
            group_step4(load_a(ba, row, 2u, lane, kq), bk, bk2, bk3, bk4, 2u, &acc, &acc2);
            group_step4(load_a(ba, row, 3u, lane, kq), bk, bk2, bk3, bk4, 3u, &acc, &acc2);
        }
        if ARGMIN {
            // Two blocks of 64 columns per subgroup (colw's and col2's, col3's and col4's).
            if wid.z + p.batch0 < p.batch {
                argmin_rows(bi, row + 0u, lane, colw, col2, 0u, &acc);
                argmin_rows(bi, row + 8u, lane, colw, col2, 8u, &acc);
                argmin_rows(bi, row + 16u, lane, colw, col2, 16u, &acc);
                argmin_rows(bi, row + 24u, lane, colw, col2, 24u, &acc);
                argmin_rows(bi, row + 0u, lane, col3, col4, 0u, &acc2);
                argmin_rows(bi, row + 8u, lane, col3, col4, 8u, &acc2);
                argmin_rows(bi, row + 16u, lane, col3, col4, 16u, &acc2);
                argmin_rows(bi, row + 24u, lane, col3, col4, 24u, &acc2);
            }
            return;
        }
        if wid.z + p.batch0 < p.batch && row < p.m {
            if colw < p.n { store_32rows(bi, row, colw, 0u, &acc); }
            if col2 < p.n { store_32rows(bi, row, col2, 32u, &acc); }
            if col3 < p.n { store_32rows(bi, row, col3, 0u, &acc2); }
            if col4 < p.n { store_32rows(bi, row, col4, 32u, &acc2); }
        }
        return;
    }
    for (var kq = p.k0 / 4u; kq < p.k1 / 4u; kq++) {
        let bk = load_b(bb, col, kq);   // rows over kk of this lane's 4 columns
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
    if ARGMIN {
        if wid.z + p.batch0 < p.batch {
            argmin_rows(bi, row + 0u, lane, col, col, 0u, &acc);
            if SG_ROWS >= 16u {
                argmin_rows(bi, row + 8u, lane, col, col, 8u, &acc);
            }
            if SG_ROWS == 32u {
                argmin_rows(bi, row + 16u, lane, col, col, 16u, &acc);
                argmin_rows(bi, row + 24u, lane, col, col, 24u, &acc);
            }
        }
        return;
    }
    if wid.z + p.batch0 < p.batch && row < p.m && col < p.n {
        store_rows(bi, row + 0u, col, 0u, &acc);
        if SG_ROWS >= 16u {
            store_rows(bi, row + 8u, col, 8u, &acc);
        }
        if SG_ROWS == 32u {
            store_rows(bi, row + 16u, col, 16u, &acc);
            store_rows(bi, row + 24u, col, 24u, &acc);
        }
    }
}
