// Softmax over the last axis of scale * x, numerically stable:
//   y_i = exp(s x_i - m) / sum_j exp(s x_j - m),   m = max_j s x_j.
// The max and the sum are found in one pass with the online rescaling trick (a running max
// and a running sum that is rescaled whenever the max grows), then a second pass writes y.
// Entries of -inf give 0; a row of only -inf gives NaN, as in torch.
//
// Two variants of the same contract:
//   softmax_rows  one invocation per row looping over it, 4 values per iteration; no
//                 workgroup memory, no barriers (CPU Vulkan such as lavapipe).
//   softmax_wg    one workgroup of 256 invocations per row; (max, sum) pairs merged by a tree
//                 in workgroup memory (GPUs, and long rows anywhere).

struct Params {
    rows: u32,
    len: u32,      // row length
    scale: f32,
    _pad: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;          // [rows, len]
@group(0) @binding(2) var<storage, read_write> y: array<f32>;    // [rows, len]

override WG: u32 = 16u;   // softmax_rows: rows per workgroup

// Start of a running max: the most negative finite f32, so that exp(m_old - m_new) stays
// finite-or-zero even when a row starts with -inf.
const NEG_BIG: f32 = -3.4028234663852886e38;

// A running sum of exp(v - m) re-expressed relative to a new max m_new >= m.
fn rescale(m: f32, s: f32, m_new: f32) -> f32 {
    return s * exp(m - m_new);
}

@compute @workgroup_size(WG)
fn softmax_rows(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                @builtin(local_invocation_index) li: u32) {
    let row = grid_index(wid, nwg, WG, li);
    if row >= p.rows {
        return;
    }
    let base = row * p.len;
    let n4 = p.len & ~3u;
    var m = NEG_BIG;
    var s = 0.0;
    for (var i = 0u; i < n4; i += 4u) {
        let j = base + i;
        let v = vec4<f32>(x[j], x[j + 1u], x[j + 2u], x[j + 3u]) * p.scale;
        let m_new = max(m, max(max(v.x, v.y), max(v.z, v.w)));
        let e = exp(v - m_new);
        s = rescale(m, s, m_new) + ((e.x + e.y) + (e.z + e.w));
        m = m_new;
    }
    for (var i = n4; i < p.len; i++) {
        let v = x[base + i] * p.scale;
        let m_new = max(m, v);
        s = rescale(m, s, m_new) + exp(v - m_new);
        m = m_new;
    }
    let r = 1.0 / s;
    for (var i = 0u; i < n4; i += 4u) {
        let j = base + i;
        let e = exp(vec4<f32>(x[j], x[j + 1u], x[j + 2u], x[j + 3u]) * p.scale - m) * r;
        y[j] = e.x;
        y[j + 1u] = e.y;
        y[j + 2u] = e.z;
        y[j + 3u] = e.w;
    }
    for (var i = n4; i < p.len; i++) {
        y[base + i] = exp(x[base + i] * p.scale - m) * r;
    }
}

const WGR: u32 = 256u;
var<workgroup> red_m: array<f32, WGR>;
var<workgroup> red_s: array<f32, WGR>;

@compute @workgroup_size(WGR)
fn softmax_wg(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
              @builtin(local_invocation_index) li: u32) {
    // One workgroup per row; rows past the end join the barriers and store nothing.
    let row = grid_group(wid, nwg);
    let live = row < p.rows;
    let base = select(0u, row, live) * p.len;
    var m = NEG_BIG;
    var s = 0.0;
    for (var i = li; i < p.len; i += WGR) {
        let v = x[base + i] * p.scale;
        let m_new = max(m, v);
        s = rescale(m, s, m_new) + exp(v - m_new);
        m = m_new;
    }
    red_m[li] = m;
    red_s[li] = s;
    workgroupBarrier();
    for (var h = WGR / 2u; h > 0u; h = h >> 1u) {
        if li < h {
            let m1 = red_m[li];
            let m2 = red_m[li + h];
            let mm = max(m1, m2);
            red_s[li] = rescale(m1, red_s[li], mm) + rescale(m2, red_s[li + h], mm);
            red_m[li] = mm;
        }
        workgroupBarrier();
    }
    let mt = red_m[0];
    let r = 1.0 / red_s[0];
    if live {
        for (var i = li; i < p.len; i += WGR) {
            y[base + i] = exp(x[base + i] * p.scale - mt) * r;
        }
    }
}
