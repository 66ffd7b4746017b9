// Backward of LayerNorm over the last axis (shaders/layer_norm.wgsl), one invocation per row.
// Forward: x̂ = (x − μ)·r, r = 1/sqrt(var + eps), y = x̂·γ + β. With g = dL/dy:
//   dx     = r · (g·γ − mean(g·γ) − x̂ · mean(g·γ·x̂))
//   gxhat  = g · x̂          (summed over rows by the caller: dγ)
// (dβ = Σ_rows g is also left to the caller.)
// Loops step by 4: llvmpipe caps the loop iterations of one invocation (ops::CPU_LOOP_LIMIT).

struct Params {
    rows: u32,
    c: u32,
    eps: f32,
    _pad: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;           // [rows, C]
@group(0) @binding(2) var<storage, read> gamma: array<f32>;       // [C] (read only if HAS_GAMMA)
@group(0) @binding(3) var<storage, read> g: array<f32>;           // [rows, C] dL/dy
@group(0) @binding(4) var<storage, read_write> dx: array<f32>;    // [rows, C]
@group(0) @binding(5) var<storage, read_write> gxhat: array<f32>; // [rows, C] g·x̂

override HAS_GAMMA: bool = false;
override WG: u32 = 16u;

fn gg(i: u32, j: u32) -> f32 {
    if HAS_GAMMA {
        return g[i] * gamma[j];
    }
    return g[i];
}

@compute @workgroup_size(WG)
fn ln_backward_rows(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                    @builtin(local_invocation_index) li: u32) {
    let row = grid_index(wid, nwg, WG, li);
    if row >= p.rows {
        return;
    }
    let base = row * p.c;
    let n = f32(p.c);
    let c4 = p.c & ~3u;
    var s = 0.0;
    for (var i = 0u; i < c4; i += 4u) {
        let j = base + i;
        s += (x[j] + x[j + 1u]) + (x[j + 2u] + x[j + 3u]);
    }
    for (var i = c4; i < p.c; i++) {
        s += x[base + i];
    }
    let mean = s / n;
    var v = 0.0;
    for (var i = 0u; i < c4; i += 4u) {
        let j = base + i;
        let d = vec4<f32>(x[j], x[j + 1u], x[j + 2u], x[j + 3u]) - mean;
        v += dot(d, d);
    }
    for (var i = c4; i < p.c; i++) {
        let d = x[base + i] - mean;
        v += d * d;
    }
    let r = inverseSqrt(v / n + p.eps);
    var a = 0.0;   // Σ g·γ
    var b = 0.0;   // Σ g·γ·x̂
    for (var i = 0u; i < p.c; i++) {
        let xh = (x[base + i] - mean) * r;
        let t = gg(base + i, i);
        a += t;
        b += t * xh;
        gxhat[base + i] = g[base + i] * xh;
    }
    a /= n;
    b /= n;
    for (var i = 0u; i < p.c; i++) {
        let xh = (x[base + i] - mean) * r;
        dx[base + i] = r * (gg(base + i, i) - a - xh * b);
    }
}
