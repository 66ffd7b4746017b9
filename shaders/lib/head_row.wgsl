// Four values of a head row, dims 4c .. 4c + 3 of D, shared by shaders/attention.wgsl and
// shaders/attention_backward.wgsl (prefixed to both; each declares `p` with a field `d` = D
// and the override D_MULT4 = (D % 4 == 0)). row4_at gives the four indices from the row's
// first value `base`, clamped to its last value when D % 4 != 0 so that no load leaves the
// row; row4_mask then reads the dims past D as 0.
fn row4_at(base: u32, c: u32) -> vec4<u32> {
    let d = vec4<u32>(4u * c) + vec4<u32>(0u, 1u, 2u, 3u);
    if D_MULT4 {
        return vec4<u32>(base) + d;
    }
    return vec4<u32>(base) + min(d, vec4<u32>(p.d - 1u));
}

fn row4_mask(c: u32, v: vec4<f32>) -> vec4<f32> {
    if D_MULT4 {
        return v;
    }
    let d = vec4<u32>(4u * c) + vec4<u32>(0u, 1u, 2u, 3u);
    return select(vec4<f32>(0.0), v, d < vec4<u32>(p.d));
}
