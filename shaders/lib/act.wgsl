// Activation functions shared by the kernels that fuse an activation epilogue.
// Codes match `ops::Act` in src/ops/mod.rs.

// Abramowitz & Stegun 7.1.26, |error| < 1.5e-7: WGSL has no erf.
fn erf_approx(x: f32) -> f32 {
    let ax = abs(x);
    let t = 1.0 / (1.0 + 0.3275911 * ax);
    let poly = ((((1.061405429 * t - 1.453152027) * t + 1.421413741) * t - 0.284496736) * t + 0.254829592) * t;
    return sign(x) * (1.0 - poly * exp(-ax * ax));
}

fn apply_act(kind: u32, x: f32) -> f32 {
    switch kind {
        // GELU, exact (erf) form: torch.nn.functional.gelu
        case 1u: { return 0.5 * x * (1.0 + erf_approx(x * 0.7071067811865476)); }
        // QuickGELU: x * sigmoid(1.702 x) (OpenAI CLIP)
        case 2u: { return x / (1.0 + exp(-1.702 * x)); }
        // SiLU / swish: x * sigmoid(x)
        case 3u: { return x / (1.0 + exp(-x)); }
        // sigmoid
        case 4u: { return 1.0 / (1.0 + exp(-x)); }
        // ReLU
        case 5u: { return max(x, 0.0); }
        // GELU, tanh approximation
        case 6u: {
            let u = 0.7978845608028654 * (x + 0.044715 * x * x * x);
            return 0.5 * x * (1.0 + tanh(clamp(u, -15.0, 15.0)));
        }
        default: { return x; }
    }
}

// d act(x) / dx, for backward passes.
fn act_grad(kind: u32, x: f32) -> f32 {
    switch kind {
        case 1u: {
            return 0.5 * (1.0 + erf_approx(x * 0.7071067811865476)) + x * 0.3989422804014327 * exp(-0.5 * x * x);
        }
        case 2u: {
            let s = 1.0 / (1.0 + exp(-1.702 * x));
            return s + 1.702 * x * s * (1.0 - s);
        }
        case 3u: {
            let s = 1.0 / (1.0 + exp(-x));
            return s * (1.0 + x * (1.0 - s));
        }
        case 4u: {
            let s = 1.0 / (1.0 + exp(-x));
            return s * (1.0 - s);
        }
        case 5u: { return select(0.0, 1.0, x > 0.0); }
        case 6u: {
            let c = 0.7978845608028654;
            let u = c * (x + 0.044715 * x * x * x);
            let t = tanh(clamp(u, -15.0, 15.0));
            return 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * c * (1.0 + 0.134145 * x * x);
        }
        default: { return 1.0; }
    }
}
