// The register tile shared by shaders/matmul_subgroup.wgsl and shaders/conv2d_igemm.wgsl
// (prefixed to both): a subgroup of 8 lanes, each lane holding one vec4 of 4 k for one row
// of a group of 8 rows, hands the rows to each other by subgroupBroadcast and multiplies
// them into its own 4 columns. Accumulators: up to 64 vec4 per lane, indexed by constants
// only (a dynamic index keeps them in memory).

// acc + a · bk, where a holds one row's 4 k and bk's columns are those k's rows of 4 columns.
fn fma_row(a: vec4<f32>, bk: mat4x4<f32>, acc: vec4<f32>) -> vec4<f32> {
    return fma(vec4<f32>(a.x), bk[0], fma(vec4<f32>(a.y), bk[1],
           fma(vec4<f32>(a.z), bk[2], fma(vec4<f32>(a.w), bk[3], acc))));
}

// Rows 0..3 and 4..7 of a group over kk from the lanes' loads: lane r's vec4 is row r's 4 k.
fn rows_lo(mine: vec4<f32>) -> mat4x4<f32> {
    return mat4x4<f32>(subgroupBroadcast(mine, 0u), subgroupBroadcast(mine, 1u),
                       subgroupBroadcast(mine, 2u), subgroupBroadcast(mine, 3u));
}
fn rows_hi(mine: vec4<f32>) -> mat4x4<f32> {
    return mat4x4<f32>(subgroupBroadcast(mine, 4u), subgroupBroadcast(mine, 5u),
                       subgroupBroadcast(mine, 6u), subgroupBroadcast(mine, 7u));
}

// acc[o + r] += (row r's 4 k) · bk for a group's 8 rows: lo holds rows 0..3, hi rows 4..7.
fn rows_fma(lo: mat4x4<f32>, hi: mat4x4<f32>, bk: mat4x4<f32>, o: u32,
            acc: ptr<function, array<vec4<f32>, 64>>) {
    (*acc)[o] = fma_row(lo[0], bk, (*acc)[o]);
    (*acc)[o + 1u] = fma_row(lo[1], bk, (*acc)[o + 1u]);
    (*acc)[o + 2u] = fma_row(lo[2], bk, (*acc)[o + 2u]);
    (*acc)[o + 3u] = fma_row(lo[3], bk, (*acc)[o + 3u]);
    (*acc)[o + 4u] = fma_row(hi[0], bk, (*acc)[o + 4u]);
    (*acc)[o + 5u] = fma_row(hi[1], bk, (*acc)[o + 5u]);
    (*acc)[o + 6u] = fma_row(hi[2], bk, (*acc)[o + 6u]);
    (*acc)[o + 7u] = fma_row(hi[3], bk, (*acc)[o + 7u]);
}
