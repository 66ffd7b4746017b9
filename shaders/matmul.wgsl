// Batched matrix multiply with a fused epilogue:
//   C[b] = act(alpha * op(A[b]) @ op(B[b]) + bias) + res[b]
// op() transposes when TRANS_A / TRANS_B is set. A batch stride of 0 broadcasts an operand
// (one weight matrix for every batch entry). The params, the epilogue bindings and the
// fused store live in shaders/lib/matmul_epilogue.wgsl, shared with matmul_subgroup.wgsl
// (a fourth variant that needs the SUBGROUP feature, hence its own module).
//
// Three variants here, of the same contract:
//   matmul_reg    4x4 outputs per invocation held in registers, no workgroup memory and no
//                 barriers: best where barriers are expensive (CPU Vulkan such as lavapipe).
//   matmul_vec4   the same 4x4 register tile, but reading 4x4 blocks of A and B as four vec4
//                 loads each per 4 steps of K (4x fewer load instructions than matmul_reg:
//                 lavapipe runs every load instruction as a loop over its SIMD lanes). Needs
//                 vec4-aligned rows along each operand's contiguous axis: K % 4 == 0, and
//                 M % 4 == 0 if TRANS_A, N % 4 == 0 unless TRANS_B (the host checks).
//   matmul_shared 64x64 tile per workgroup staged through workgroup memory, BK = 16:
//                 for GPUs.
//   matmul_tile128 128x128 tile per workgroup of 256, 8x8 outputs per invocation, BK = 8,
//                 operands staged through workgroup memory read back as vec4 (two vec4 of
//                 A and two of B feed 64 FMAs), double-buffered: the next K slice is loaded
//                 from memory into registers while the current one is multiplied, so one
//                 barrier per slice suffices. For large products on GPUs.

// A, C and the residual are stored as `elem` (shaders/lib/elem_f32.wgsl, or elem_f16.wgsl for
// f16 activations) and widened to f32 as they are read.
@group(0) @binding(1) var<storage, read> a: array<elem>;         // [batch, M, K], [batch, K, M] if TRANS_A
// The same A buffer viewed as vec4 (matmul_vec4 only; no entry point uses both views).
@group(0) @binding(1) var<storage, read> a4: array<vec4<elem>>;
// B (binding 2) and its reads b_load / b4_load come from shaders/lib/matmul_b_f32.wgsl, or
// matmul_b_f16.wgsl for the f16-weight twin of this module.

fn a_at(base: u32, i: u32, kk: u32) -> f32 {
    if TRANS_A {
        return f32(a[base + kk * p.m + i]);
    }
    return f32(a[base + i * p.k + kk]);
}

// Elements 4i .. 4i + 3 of A, widened to f32.
fn a4_load(i: u32) -> vec4<f32> {
    return vec4<f32>(a4[i]);
}

fn b_at(base: u32, kk: u32, j: u32) -> f32 {
    if TRANS_B {
        return b_load(base + j * p.k + kk);
    }
    return b_load(base + kk * p.n + j);
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

@compute @workgroup_size(8, 8, 1)
fn matmul_vec4(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let bi = wid.z + p.batch0;
    let row = p.row0 + (wid.y * 8u + lid.y) * 4u;
    let col = (wid.x * 8u + lid.x) * 4u;
    if row >= p.m || col >= p.n || bi >= p.batch {
        return;
    }
    // Batch offsets and row lengths in vec4 units (all multiples of 4 values).
    let ba = bi * p.stride_a / 4u;
    let bb = bi * p.stride_b / 4u;
    let k4 = p.k / 4u;
    let m4 = p.m / 4u;
    let n4 = p.n / 4u;
    // Rows past M (A row-major) and columns past N (B transposed) re-read the last valid
    // one; their results are never stored.
    let r = min(vec4<u32>(row, row + 1u, row + 2u, row + 3u), vec4<u32>(p.m - 1u));
    let cl = min(vec4<u32>(col, col + 1u, col + 2u, col + 3u), vec4<u32>(p.n - 1u));
    var acc0 = vec4<f32>(0.0);
    var acc1 = vec4<f32>(0.0);
    var acc2 = vec4<f32>(0.0);
    var acc3 = vec4<f32>(0.0);
    for (var kq = p.k0 / 4u; kq < p.k1 / 4u; kq++) {
        // A block as four rows over kk (transposed from four columns over rows if TRANS_A).
        var ab: mat4x4<f32>;
        if TRANS_A {
            let o = ba + 4u * kq * m4 + row / 4u;
            ab = transpose(mat4x4<f32>(a4_load(o), a4_load(o + m4), a4_load(o + 2u * m4), a4_load(o + 3u * m4)));
        } else {
            ab = mat4x4<f32>(a4_load(ba + r.x * k4 + kq), a4_load(ba + r.y * k4 + kq),
                             a4_load(ba + r.z * k4 + kq), a4_load(ba + r.w * k4 + kq));
        }
        // B block as four rows over kk of outputs j (transposed if TRANS_B).
        var bk: mat4x4<f32>;
        if TRANS_B {
            bk = transpose(mat4x4<f32>(b4_load(bb + cl.x * k4 + kq), b4_load(bb + cl.y * k4 + kq),
                                       b4_load(bb + cl.z * k4 + kq), b4_load(bb + cl.w * k4 + kq)));
        } else {
            let o = bb + 4u * kq * n4 + col / 4u;
            bk = mat4x4<f32>(b4_load(o), b4_load(o + n4), b4_load(o + 2u * n4), b4_load(o + 3u * n4));
        }
        acc0 = fma(vec4<f32>(ab[0].x), bk[0], acc0);
        acc0 = fma(vec4<f32>(ab[0].y), bk[1], acc0);
        acc0 = fma(vec4<f32>(ab[0].z), bk[2], acc0);
        acc0 = fma(vec4<f32>(ab[0].w), bk[3], acc0);
        acc1 = fma(vec4<f32>(ab[1].x), bk[0], acc1);
        acc1 = fma(vec4<f32>(ab[1].y), bk[1], acc1);
        acc1 = fma(vec4<f32>(ab[1].z), bk[2], acc1);
        acc1 = fma(vec4<f32>(ab[1].w), bk[3], acc1);
        acc2 = fma(vec4<f32>(ab[2].x), bk[0], acc2);
        acc2 = fma(vec4<f32>(ab[2].y), bk[1], acc2);
        acc2 = fma(vec4<f32>(ab[2].z), bk[2], acc2);
        acc2 = fma(vec4<f32>(ab[2].w), bk[3], acc2);
        acc3 = fma(vec4<f32>(ab[3].x), bk[0], acc3);
        acc3 = fma(vec4<f32>(ab[3].y), bk[1], acc3);
        acc3 = fma(vec4<f32>(ab[3].z), bk[2], acc3);
        acc3 = fma(vec4<f32>(ab[3].w), bk[3], acc3);
    }
    store_tile(bi, row, col, array<vec4<f32>, 4>(acc0, acc1, acc2, acc3));
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

// matmul_tile128: the tile of shaders/lib/tile128.wgsl (T128, BK8, sa, sb, tile_fma).

// Where element e of a [BK8][T128] slice sits, walked along the operand's contiguous axis:
// (index along the tile's 128 rows or columns, kk). `k_major`: the operand is stored with k
// as the slow axis (A transposed, B not), so the walk goes along the 128 first.
fn slice_pos(e: u32, k_major: bool) -> vec2<u32> {
    if k_major {
        return vec2<u32>(e % T128, e / T128);
    }
    return vec2<u32>(e / BK8, e % BK8);
}

// The 4 elements this invocation stages of each operand for the K slice at k0: element e =
// li + 256 * l of the slice.
fn stage_a(ba: u32, row_base: u32, k0: u32, li: u32) -> vec4<f32> {
    var v: vec4<f32>;
    for (var l = 0u; l < 4u; l++) {
        let at = slice_pos(li + l * 256u, TRANS_A);
        let gi = row_base + at.x;
        let gk = k0 + at.y;
        var x = 0.0;
        if gi < p.m && gk < p.k1 {
            x = a_at(ba, gi, gk);
        }
        v[l] = x;
    }
    return v;
}

fn stage_b(bb: u32, col_base: u32, k0: u32, li: u32) -> vec4<f32> {
    var v: vec4<f32>;
    for (var l = 0u; l < 4u; l++) {
        let at = slice_pos(li + l * 256u, !TRANS_B);
        let gj = col_base + at.x;
        let gk = k0 + at.y;
        var x = 0.0;
        if gj < p.n && gk < p.k1 {
            x = b_at(bb, gk, gj);
        }
        v[l] = x;
    }
    return v;
}

// Writes staged values into buffer `buf` at the places stage_a / stage_b read them from.
fn put_a(buf: u32, li: u32, v: vec4<f32>) {
    for (var l = 0u; l < 4u; l++) {
        let at = slice_pos(li + l * 256u, TRANS_A);
        tile_put_a(buf, at.x, at.y, v[l]);
    }
}

fn put_b(buf: u32, li: u32, v: vec4<f32>) {
    for (var l = 0u; l < 4u; l++) {
        let at = slice_pos(li + l * 256u, !TRANS_B);
        tile_put_b(buf, at.x, at.y, v[l]);
    }
}

@compute @workgroup_size(16, 16, 1)
fn matmul_tile128(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(local_invocation_id) lid: vec3<u32>,
    @builtin(local_invocation_index) li: u32,
) {
    let bi = min(wid.z + p.batch0, p.batch - 1u);
    let row_base = p.row0 + wid.y * T128;
    let col_base = wid.x * T128;
    let ba = bi * p.stride_a;
    let bb = bi * p.stride_b;
    // This invocation's 8 rows and 8 columns: see tile_fma.
    var acc: array<vec4<f32>, 16>;
    put_a(0u, li, stage_a(ba, row_base, p.k0, li));
    put_b(0u, li, stage_b(bb, col_base, p.k0, li));
    workgroupBarrier();
    var cur = 0u;
    for (var k0 = p.k0; k0 < p.k1; k0 += BK8) {
        // Fetch the next slice while this one is multiplied.
        let more = k0 + BK8 < p.k1;
        var na = vec4<f32>(0.0);
        var nb = vec4<f32>(0.0);
        if more {
            na = stage_a(ba, row_base, k0 + BK8, li);
            nb = stage_b(bb, col_base, k0 + BK8, li);
        }
        tile_fma(cur, lid.xy, &acc);
        if more {
            // The other buffer was last read before the previous barrier: safe to fill.
            put_a(1u - cur, li, na);
            put_b(1u - cur, li, nb);
        }
        workgroupBarrier();
        cur = 1u - cur;
    }
    if ARGMIN {
        // One block per invocation: its 8 columns, c0 .. c0 + 3 and 64 further on; 16
        // blocks per tile, interleaved (the reduction orders ties by column).
        if wid.z + p.batch0 < p.batch {
            let r0 = row_base + lid.y * 4u;
            let c0 = col_base + lid.x * 4u;
            let blocks = (p.n + T128 - 1u) / T128 * 16u;
            let block = wid.x * 16u + lid.x;
            for (var r = 0u; r < 4u; r++) {
                let lo = argmin_fold(argmin_fold(argmin_none(), c0, acc[2u * r]), c0 + 64u, acc[2u * r + 1u]);
                if r0 + r < p.m {
                    argmin_put(bi, r0 + r, blocks, block, lo);
                }
                let hi = argmin_fold(argmin_fold(argmin_none(), c0, acc[8u + 2u * r]), c0 + 64u, acc[9u + 2u * r]);
                if r0 + 64u + r < p.m {
                    argmin_put(bi, r0 + 64u + r, blocks, block, hi);
                }
            }
        }
        return;
    }
    if wid.z + p.batch0 < p.batch {
        let r0 = row_base + lid.y * 4u;
        let c0 = col_base + lid.x * 4u;
        store_tile(bi, r0, c0, array<vec4<f32>, 4>(acc[0], acc[2], acc[4], acc[6]));
        store_tile(bi, r0, c0 + 64u, array<vec4<f32>, 4>(acc[1], acc[3], acc[5], acc[7]));
        store_tile(bi, r0 + 64u, c0, array<vec4<f32>, 4>(acc[8], acc[10], acc[12], acc[14]));
        store_tile(bi, r0 + 64u, c0 + 64u, array<vec4<f32>, 4>(acc[9], acc[11], acc[13], acc[15]));
    }
}
