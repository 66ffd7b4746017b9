// The 128x128 workgroup tile shared by matmul_tile128 (shaders/matmul.wgsl) and
// conv2d_igemm_tiled (shaders/conv2d_igemm_tiled.wgsl): 16x16 invocations, 8x8 outputs
// each, K in slices of BK8 staged in workgroup memory, two buffers so that the next slice
// can be written while the current one is read (one barrier per slice). Each kernel stages
// its own operands (a matmul reads A and B, a convolution gathers B from its input) with
// tile_put_a / tile_put_b and keeps its own store.

const T128: u32 = 128u;
const BK8: u32 = 8u;
// [2 buffers][BK8][T128 / 4] as vec4 over the tile's rows (A) or columns (B).
var<workgroup> sa: array<vec4<f32>, 512>;
var<workgroup> sb: array<vec4<f32>, 512>;

// Puts A[row i of the tile, kk of the slice] (B[kk, column i]) into buffer `buf`.
fn tile_put_a(buf: u32, i: u32, kk: u32, v: f32) {
    sa[buf * 256u + kk * 32u + i / 4u][i % 4u] = v;
}

fn tile_put_b(buf: u32, i: u32, kk: u32, v: f32) {
    sb[buf * 256u + kk * 32u + i / 4u][i % 4u] = v;
}

// acc += the staged slice in buffer `cur` for invocation `lid`: its 8 rows are lid.y * 4 +
// {0..3} and 64 + lid.y * 4 + {0..3} (two vec4 of the staged A, 16 vec4 apart), its
// columns likewise from lid.x; acc[2 * r + h] holds row r of the first 4 (acc[8 + 2 * r +
// h] of the second) over column half h.
fn tile_fma(cur: u32, lid: vec2<u32>, acc: ptr<function, array<vec4<f32>, 16>>) {
    for (var kk = 0u; kk < BK8; kk++) {
        let o = cur * 256u + kk * 32u;
        let a0 = sa[o + lid.y];
        let a1 = sa[o + 16u + lid.y];
        let b0 = sb[o + lid.x];
        let b1 = sb[o + 16u + lid.x];
        for (var r = 0u; r < 4u; r++) {
            (*acc)[2u * r] = fma(vec4<f32>(a0[r]), b0, (*acc)[2u * r]);
            (*acc)[2u * r + 1u] = fma(vec4<f32>(a0[r]), b1, (*acc)[2u * r + 1u]);
            (*acc)[8u + 2u * r] = fma(vec4<f32>(a1[r]), b0, (*acc)[8u + 2u * r]);
            (*acc)[9u + 2u * r] = fma(vec4<f32>(a1[r]), b1, (*acc)[9u + 2u * r]);
        }
    }
}
