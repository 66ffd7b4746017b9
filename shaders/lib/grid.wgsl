// The 1-D grid of `gpu::grid_1d`: past 65,535 workgroups a dispatch is split over x and y,
// and a kernel rebuilds the linear index from both (and skips indices past its count).

// Linear index of this workgroup.
fn grid_group(wid: vec3<u32>, nwg: vec3<u32>) -> u32 {
    return wid.x + wid.y * nwg.x;
}

// Linear index of invocation `li` of a workgroup of `size` invocations.
fn grid_index(wid: vec3<u32>, nwg: vec3<u32>, size: u32, li: u32) -> u32 {
    return grid_group(wid, nwg) * size + li;
}
