// Elementwise ops.
//   unary:  y = f(x; alpha, beta)                       OP = UnaryOp code (src/ops/elementwise.rs)
//   binary: y = f(a[bcast], b[bcast])  with broadcasting over up to 8 dims, OP = BinaryOp code
// One invocation per output element; the grid is folded into x/y (65,535 per dimension).

struct Params {
    n: u32,          // output elements
    rank: u32,       // dims used in out_dims / strides (binary only)
    alpha: f32,
    beta: f32,
    out_dims: array<vec4<u32>, 2>,   // output shape, dims 0..7, innermost last
    a_strides: array<vec4<u32>, 2>,  // element strides of a per output dim (0 = broadcast)
    b_strides: array<vec4<u32>, 2>,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> a: array<f32>;
@group(0) @binding(2) var<storage, read> b: array<f32>;        // binary only (bound to a for unary)
@group(0) @binding(3) var<storage, read_write> y: array<f32>;

override OP: u32 = 0u;
override WG: u32 = 256u;

// acos to ~1e-7 (Abramowitz & Stegun 4.4.46, |error| <= 2e-8 on [0, 1]); the built-in acos
// is far less accurate on some drivers (2e-4 rad seen on llvmpipe).
fn acos_precise(v: f32) -> f32 {
    let x = clamp(v, -1.0, 1.0);
    let a = abs(x);
    let poly = ((((((-0.0012624911 * a + 0.0066700901) * a - 0.0170881256) * a + 0.0308918810) * a
        - 0.0501743046) * a + 0.0889789874) * a - 0.2145988016) * a + 1.5707963050;
    let r = sqrt(1.0 - a) * poly;
    return select(r, 3.14159265358979 - r, x < 0.0);
}

fn unary_op(x: f32) -> f32 {
    switch OP {
        // 0..15 are activations (shaders/lib/act.wgsl)
        case 16u: { return x * p.alpha + p.beta; }          // affine
        case 17u: { return clamp(x, p.alpha, p.beta); }     // clamp
        case 18u: { return exp(x); }
        case 19u: { return log(x); }
        case 20u: { return sqrt(x); }
        case 21u: { return inverseSqrt(x); }
        case 22u: { return x * x; }
        case 23u: { return abs(x); }
        case 24u: { return 1.0 / x; }
        case 25u: { return tanh(x); }
        case 26u: { return pow(x, p.alpha); }
        // x = cos θ of unit vectors: θ²/2, the VQGAN+CLIP spherical distance loss
        case 27u: {
            let t = acos_precise(x);
            return 0.5 * t * t;
        }
        default: { return apply_act(OP, x); }
    }
}

@compute @workgroup_size(WG)
fn unary(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
         @builtin(local_invocation_index) li: u32) {
    let i = grid_index(wid, nwg, WG, li);
    if i >= p.n {
        return;
    }
    // `b` aliases `a` for unary dispatches; touch it so the binding stays in the layout.
    y[i] = unary_op(a[i]) + 0.0 * b[0];
}

fn dim(i: u32) -> u32 { return p.out_dims[i / 4u][i % 4u]; }
fn sa(i: u32) -> u32 { return p.a_strides[i / 4u][i % 4u]; }
fn sb(i: u32) -> u32 { return p.b_strides[i / 4u][i % 4u]; }

fn binary_op(x: f32, z: f32) -> f32 {
    switch OP {
        case 1u: { return x - z; }
        case 2u: { return x * z; }
        case 3u: { return x / z; }
        case 4u: { return max(x, z); }
        case 5u: { return min(x, z); }
        case 6u: { return (x - z) * (x - z); }
        // z where x > alpha, else 0: the gradient through max(x, alpha) (a prompt's `stop`)
        case 7u: { return select(0.0, z, x > p.alpha); }
        // ClampWithGrad's backward at x with gradient z: z passes inside [alpha, beta], and
        // outside it only when a descent step (−z) moves x back toward the range.
        case 9u: {
            let d = x - clamp(x, p.alpha, p.beta);
            return select(0.0, z, z * d >= 0.0);
        }
        // z · d(θ²/2)/d cos θ = −z · θ / sin θ (→ −z as θ → 0), backward of unary code 27
        case 8u: {
            let c = clamp(x, -1.0, 1.0);
            let t = acos_precise(c);
            let s = sqrt(max(1.0 - c * c, 0.0));
            var r = 1.0;
            if s > 1e-4 {
                r = t / s;
            }
            return -z * r;
        }
        // 32 + act code: z * act'(x), the backward of an activation at input x
        default: {
            if OP >= 32u {
                return z * act_grad(OP - 32u, x);
            }
            return x + z;
        }
    }
}

@compute @workgroup_size(WG)
fn binary(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
          @builtin(local_invocation_index) li: u32) {
    let i = grid_index(wid, nwg, WG, li);
    if i >= p.n {
        return;
    }
    var rem = i;
    var ia = 0u;
    var ib = 0u;
    for (var d = i32(p.rank) - 1; d >= 0; d--) {
        let dd = u32(d);
        let c = rem % dim(dd);
        rem = rem / dim(dd);
        ia += c * sa(dd);
        ib += c * sb(dd);
    }
    y[i] = binary_op(a[ia], b[ib]);
}
