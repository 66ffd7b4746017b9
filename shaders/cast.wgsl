// f32 <-> f16 conversion, one invocation per element: the edges of the `--precision f16`
// inference path, whose activations are stored as f16 (ops::cast). f32 -> f16 rounds to one
// of the two nearest f16 values (WGSL leaves the tie rule to the device); values beyond f16's
// range (|x| > 65504) saturate to ±65504 rather than becoming an undefined value, and NaN
// stays NaN. f16 -> f32 is exact.

struct Params {
    n: u32,
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x32: array<f32>;
@group(0) @binding(2) var<storage, read_write> y16: array<f16>;
// to_f32's views of the same bindings (no entry point uses both pairs).
@group(0) @binding(1) var<storage, read> x16: array<f16>;
@group(0) @binding(2) var<storage, read_write> y32: array<f32>;

const WG: u32 = 64u;
const F16_MAX: f32 = 65504.0;

@compute @workgroup_size(WG)
fn to_f16(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
          @builtin(local_invocation_index) li: u32) {
    let i = grid_index(wid, nwg, WG, li);
    if i >= p.n {
        return;
    }
    let v = x32[i];
    // NaN is told by its bits: compilers may fold `v != v` to false (WGSL lets them assume
    // no NaN), and clamp() of NaN is unspecified.
    if (bitcast<u32>(v) & 0x7fffffffu) > 0x7f800000u {
        y16[i] = f16(v);
        return;
    }
    y16[i] = f16(clamp(v, -F16_MAX, F16_MAX));
}

@compute @workgroup_size(WG)
fn to_f32(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
          @builtin(local_invocation_index) li: u32) {
    let i = grid_index(wid, nwg, WG, li);
    if i >= p.n {
        return;
    }
    y32[i] = f32(x16[i]);
}
