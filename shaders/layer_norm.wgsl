// LayerNorm over the last axis, as torch.nn.LayerNorm:
//   y = (x - mean) / sqrt(var + eps) * gamma + beta,  var biased (divided by C).
// Statistics are two-pass (mean first, then the mean of squared deviations), so rows with a
// large mean lose no precision.
//
// Two variants of the same contract:
//   ln_rows  one invocation per row looping over it; no workgroup memory, no barriers
//            (CPU Vulkan such as lavapipe).
//   ln_wg    one workgroup of 256 invocations per row, tree reductions in workgroup memory
//            (GPUs).

struct Params {
    rows: u32,
    c: u32,        // row length
    eps: f32,
    _pad: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
// x and y are `elem`: f32, or f16 for the f16-activation twin (shaders/lib/elem_f32.wgsl);
// statistics and arithmetic are f32 either way.
@group(0) @binding(1) var<storage, read> x: array<elem>;         // [rows, C]
@group(0) @binding(2) var<storage, read> gamma: array<f32>;      // [C] (read only if HAS_GAMMA)
@group(0) @binding(3) var<storage, read> beta: array<f32>;       // [C] (read only if HAS_BETA)
@group(0) @binding(4) var<storage, read_write> y: array<elem>;   // [rows, C]

override HAS_GAMMA: bool = false;
override HAS_BETA: bool = false;
override WG: u32 = 64u;   // ln_rows: rows per workgroup

// x[i] widened to f32.
fn xv(i: u32) -> f32 {
    return f32(x[i]);
}

// The affine map of normalised value `v` at column i, rounded to the storage type.
fn affine(v: f32, i: u32) -> elem {
    var r = v;
    if HAS_GAMMA {
        r *= gamma[i];
    }
    if HAS_BETA {
        r += beta[i];
    }
    return elem(r);
}

// The row loops step by 4 (llvmpipe stops every loop of an invocation after 65,535
// iterations in total; see ops::CPU_LOOP_LIMIT). c4 = C rounded down to a multiple of 4.
@compute @workgroup_size(WG)
fn ln_rows(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
           @builtin(local_invocation_index) li: u32) {
    let row = grid_index(wid, nwg, WG, li);
    if row >= p.rows {
        return;
    }
    let base = row * p.c;
    let c4 = p.c & ~3u;
    let n = f32(p.c);
    var s4 = vec4<f32>(0.0);
    for (var i = 0u; i < c4; i += 4u) {
        let j = base + i;
        s4 += vec4<f32>(xv(j), xv(j + 1u), xv(j + 2u), xv(j + 3u));
    }
    var s = (s4.x + s4.y) + (s4.z + s4.w);
    for (var i = c4; i < p.c; i++) {
        s += xv(base + i);
    }
    let mean = s / n;
    var v4 = vec4<f32>(0.0);
    for (var i = 0u; i < c4; i += 4u) {
        let j = base + i;
        let d = vec4<f32>(xv(j), xv(j + 1u), xv(j + 2u), xv(j + 3u)) - mean;
        v4 = fma(d, d, v4);
    }
    var v = (v4.x + v4.y) + (v4.z + v4.w);
    for (var i = c4; i < p.c; i++) {
        let d = xv(base + i) - mean;
        v = fma(d, d, v);
    }
    let rstd = inverseSqrt(v / n + p.eps);
    for (var i = 0u; i < c4; i += 4u) {
        let j = base + i;
        y[j] = affine((xv(j) - mean) * rstd, i);
        y[j + 1u] = affine((xv(j + 1u) - mean) * rstd, i + 1u);
        y[j + 2u] = affine((xv(j + 2u) - mean) * rstd, i + 2u);
        y[j + 3u] = affine((xv(j + 3u) - mean) * rstd, i + 3u);
    }
    for (var i = c4; i < p.c; i++) {
        y[base + i] = affine((xv(base + i) - mean) * rstd, i);
    }
}

const WGR: u32 = 256u;
var<workgroup> red: array<f32, WGR>;

// Sum of `v` over the workgroup; every invocation gets the result.
fn wg_sum(v: f32, li: u32) -> f32 {
    red[li] = v;
    workgroupBarrier();
    for (var s = WGR / 2u; s > 0u; s = s >> 1u) {
        if li < s {
            red[li] += red[li + s];
        }
        workgroupBarrier();
    }
    let r = red[0];
    workgroupBarrier();
    return r;
}

@compute @workgroup_size(WGR)
fn ln_wg(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
         @builtin(local_invocation_index) li: u32) {
    // One workgroup per row; the grid is folded into x/y. Rows past the end still take part
    // in the barriers (they read row 0) and store nothing.
    let row = grid_group(wid, nwg);
    let live = row < p.rows;
    let base = select(0u, row, live) * p.c;
    let n = f32(p.c);
    var s = 0.0;
    for (var i = li; i < p.c; i += WGR) {
        s += xv(base + i);
    }
    let mean = wg_sum(s, li) / n;
    var v = 0.0;
    for (var i = li; i < p.c; i += WGR) {
        let d = xv(base + i) - mean;
        v = fma(d, d, v);
    }
    let rstd = inverseSqrt(wg_sum(v, li) / n + p.eps);
    if live {
        for (var i = li; i < p.c; i += WGR) {
            y[base + i] = affine((xv(base + i) - mean) * rstd, i);
        }
    }
}
