// Projective warp with bilinear sampling and zero padding, NCHW, one 3x3 homography per image.
//
// m: [N, 18]: m[n][0..9] maps output pixel (x, y, 1) to input pixel coordinates (row-major
// 3x3, pixel centres at integers); m[n][9..18] is its inverse (input -> output), used by the
// backward pass to find the outputs that sample an input pixel.
//
// warp_forward: one invocation per output element:
//   y[n, c, yo, xo] = sum over the 4 taps t around p = H(xo, yo) of w_t * x[n, c, t]
//   (taps outside the input are zero).
// warp_backward: one invocation per INPUT element, gathering (no atomics, a fixed order, so
// the result is deterministic):
//   dx[n, c, yi, xi] = sum over outputs o with |p_x - xi| < 1 and |p_y - yi| < 1 of
//                      g[n, c, o] * (1 - |p_x - xi|) * (1 - |p_y - yi|)
//   The outputs are searched in the bounding box of the inverse image of the square
//   (xi - 1, xi + 1) x (yi - 1, yi + 1); each candidate's p is computed exactly as in the
//   forward pass, so the result is the forward pass's adjoint.

struct Params {
    total: u32,     // elements of the output (forward) or of the input (backward)
    ih: u32,
    iw: u32,
    oh: u32,
    ow: u32,
    c: u32,
    _pad0: u32,
    _pad1: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> src: array<f32>;        // fwd: x [N,C,IH,IW]; bwd: g [N,C,OH,OW]
@group(0) @binding(2) var<storage, read> m: array<f32>;          // [N, 18]
@group(0) @binding(3) var<storage, read_write> dst: array<f32>;  // fwd: y [N,C,OH,OW]; bwd: dx [N,C,IH,IW]

const WG: u32 = 256u;

// H(v) for the homography at m[base..base+9], as (x, y, w).
fn apply(base: u32, x: f32, y: f32) -> vec3<f32> {
    return vec3<f32>(
        m[base] * x + m[base + 1u] * y + m[base + 2u],
        m[base + 3u] * x + m[base + 4u] * y + m[base + 5u],
        m[base + 6u] * x + m[base + 7u] * y + m[base + 8u],
    );
}

// Input coordinates sampled by output pixel (xo, yo) of image n; NaN-free: a point at or
// behind the horizon (w <= 0) is sent far outside the image.
fn sample_point(n: u32, xo: u32, yo: u32) -> vec2<f32> {
    let h = apply(n * 18u, f32(xo), f32(yo));
    if h.z <= 1e-12 {
        return vec2<f32>(-1e9, -1e9);
    }
    return vec2<f32>(h.x / h.z, h.y / h.z);
}

fn tap(plane: u32, yi: i32, xi: i32) -> f32 {
    if xi < 0 || yi < 0 || xi >= i32(p.iw) || yi >= i32(p.ih) {
        return 0.0;
    }
    return src[plane + u32(yi) * p.iw + u32(xi)];
}

@compute @workgroup_size(256, 1, 1)
fn warp_forward(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                @builtin(local_invocation_index) li: u32) {
    let i = grid_index(wid, nwg, WG, li);
    if i >= p.total {
        return;
    }
    let xo = i % p.ow;
    let yo = (i / p.ow) % p.oh;
    let nc = i / (p.ow * p.oh);
    let n = nc / p.c;
    let q = sample_point(n, xo, yo);
    if q.x <= -1.0 || q.y <= -1.0 || q.x >= f32(p.iw) || q.y >= f32(p.ih) {
        dst[i] = 0.0;
        return;
    }
    let x0 = floor(q.x);
    let y0 = floor(q.y);
    let fx = q.x - x0;
    let fy = q.y - y0;
    let plane = nc * p.ih * p.iw;
    let ix = i32(x0);
    let iy = i32(y0);
    let top = (1.0 - fx) * tap(plane, iy, ix) + fx * tap(plane, iy, ix + 1);
    let bottom = (1.0 - fx) * tap(plane, iy + 1, ix) + fx * tap(plane, iy + 1, ix + 1);
    dst[i] = (1.0 - fy) * top + fy * bottom;
}

@compute @workgroup_size(256, 1, 1)
fn warp_backward(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                 @builtin(local_invocation_index) li: u32) {
    let i = grid_index(wid, nwg, WG, li);
    if i >= p.total {
        return;
    }
    let xi = i % p.iw;
    let yi = (i / p.iw) % p.ih;
    let nc = i / (p.iw * p.ih);
    let n = nc / p.c;
    let fxi = f32(xi);
    let fyi = f32(yi);
    // Bounding box (in output pixels) of the inverse image of the open square around the
    // input pixel; the whole output when a corner is at or behind the horizon.
    var lo = vec2<f32>(1e30, 1e30);
    var hi = vec2<f32>(-1e30, -1e30);
    var whole = false;
    for (var k = 0u; k < 4u; k++) {
        let cx = fxi + select(-1.0, 1.0, (k & 1u) == 1u);
        let cy = fyi + select(-1.0, 1.0, (k & 2u) == 2u);
        let h = apply(n * 18u + 9u, cx, cy);
        if h.z <= 1e-12 {
            whole = true;
        } else {
            let q = vec2<f32>(h.x / h.z, h.y / h.z);
            lo = min(lo, q);
            hi = max(hi, q);
        }
    }
    var x_lo = 0;
    var y_lo = 0;
    var x_hi = i32(p.ow) - 1;
    var y_hi = i32(p.oh) - 1;
    if !whole {
        // One pixel of margin for rounding; clamped in float first (no overflow in i32()).
        x_lo = max(x_lo, i32(clamp(floor(lo.x) - 1.0, -1.0, f32(p.ow))));
        y_lo = max(y_lo, i32(clamp(floor(lo.y) - 1.0, -1.0, f32(p.oh))));
        x_hi = min(x_hi, i32(clamp(ceil(hi.x) + 1.0, -1.0, f32(p.ow))));
        y_hi = min(y_hi, i32(clamp(ceil(hi.y) + 1.0, -1.0, f32(p.oh))));
    }
    let plane = nc * p.oh * p.ow;
    var acc = 0.0;
    for (var yo = y_lo; yo <= y_hi; yo++) {
        for (var xo = x_lo; xo <= x_hi; xo++) {
            let q = sample_point(n, u32(xo), u32(yo));
            let dx = abs(q.x - fxi);
            let dy = abs(q.y - fyi);
            if dx < 1.0 && dy < 1.0 {
                acc += src[plane + u32(yo) * p.ow + u32(xo)] * (1.0 - dx) * (1.0 - dy);
            }
        }
    }
    dst[i] = acc;
}
