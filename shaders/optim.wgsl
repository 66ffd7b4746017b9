// Adam / AdamW update, in place, one invocation per parameter (PyTorch semantics):
//   g' = g + wd·p                      (Adam's L2 weight decay; 0 for AdamW)
//   p  = p − lr·wd_decoupled·p         (AdamW's decoupled decay; 0 for Adam)
//   m  = β1·m + (1−β1)·g'
//   v  = β2·v + (1−β2)·g'²
//   p  = p − lr · (m / (1−β1^t)) / (sqrt(v / (1−β2^t)) + eps)

struct Params {
    n: u32,
    lr: f32,
    beta1: f32,
    beta2: f32,
    eps: f32,
    weight_decay: f32,   // L2 term added to the gradient (Adam)
    decoupled: f32,      // decoupled decay factor (AdamW)
    bias1: f32,          // 1 − β1^t
    bias2: f32,          // 1 − β2^t
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> grad: array<f32>;          // [n]
@group(0) @binding(2) var<storage, read_write> param: array<f32>;   // [n]
@group(0) @binding(3) var<storage, read_write> m: array<f32>;       // [n] first moment
@group(0) @binding(4) var<storage, read_write> v: array<f32>;       // [n] second moment

const WG: u32 = 256u;

@compute @workgroup_size(WG)
fn adam(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) li: u32) {
    let i = grid_index(wid, nwg, WG, li);
    if i >= p.n {
        return;
    }
    var w = param[i];
    let g = grad[i] + p.weight_decay * w;
    w = w - p.lr * p.decoupled * w;
    let mi = p.beta1 * m[i] + (1.0 - p.beta1) * g;
    let vi = p.beta2 * v[i] + (1.0 - p.beta2) * g * g;
    m[i] = mi;
    v[i] = vi;
    param[i] = w - p.lr * (mi / p.bias1) / (sqrt(vi / p.bias2) + p.eps);
}
