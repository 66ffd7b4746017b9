// GroupNorm, as torch.nn.GroupNorm, with an optional fused activation:
//   y = act((x - mean_g) / sqrt(var_g + eps) * gamma[c] + beta[c])
// over x [N, C, S] (S = H*W, or L), groups of C/G consecutive channels, so each group is
// one contiguous run of M = C/G * S values. Biased variance, two-pass statistics, no
// atomics and no barriers (deterministic, and cheap on CPU Vulkan):
//   gn_sum   (SQ = false) partial sums of x, P per group: partial p adds units p, p+P, ..
//            (SQ = true)  the same for (x - mean)^2
//   gn_stats (SQ = false) mean = sum of partials / M;  (SQ = true) rstd
//   gn_apply one invocation per unit: normalise, affine, activation
// A unit is a vec4 when VEC (S % 4 == 0: groups and channels start on 16-byte boundaries),
// else one value. Interleaved partials make neighbouring invocations read neighbouring
// units (coalesced on GPUs); each partial covers at most 1,024 units (llvmpipe stops loops
// after 65,535 iterations; see ops::CPU_LOOP_LIMIT).

struct Params {
    groups_total: u32,  // N * G
    g: u32,             // G
    cpg: u32,           // channels per group
    s: u32,             // spatial size S
    m: u32,             // values per group, C/G * S
    parts: u32,         // P, partials per group
    stats: u32,         // offset of the (mean, rstd) pairs in `work`
    eps: f32,
    units: u32,         // units in all of x
    _pad0: u32, _pad1: u32, _pad2: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
// [N*G*P] partial sums, then [N*G, 2] (mean, rstd) from `stats` on.
@group(0) @binding(1) var<storage, read_write> work: array<f32>;
@group(0) @binding(2) var<storage, read> x: array<vec4<f32>>;       // [N, C, S], padded to vec4
@group(0) @binding(3) var<storage, read> gamma: array<f32>;         // [C] (if HAS_GAMMA)
@group(0) @binding(4) var<storage, read> beta: array<f32>;          // [C] (if HAS_BETA)
@group(0) @binding(5) var<storage, read_write> y: array<vec4<f32>>; // [N, C, S], padded

override VEC: bool = true;
override SQ: bool = false;
override HAS_GAMMA: bool = false;
override HAS_BETA: bool = false;
override ACT: u32 = 0u;
override WG: u32 = 64u;

fn scalar_at(e: u32) -> f32 {
    return x[e / 4u][e % 4u];
}

@compute @workgroup_size(WG)
fn gn_sum(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
          @builtin(local_invocation_index) li: u32) {
    let id = grid_index(wid, nwg, WG, li);
    if id >= p.groups_total * p.parts {
        return;
    }
    let grp = id / p.parts;
    let part = id % p.parts;
    var mean = 0.0;
    if SQ {
        mean = work[p.stats + 2u * grp];
    }
    if VEC {
        let base = grp * (p.m / 4u);
        var acc = vec4<f32>(0.0);
        for (var u = part; u < p.m / 4u; u += p.parts) {
            let v = x[base + u];
            if SQ {
                let d = v - mean;
                acc = fma(d, d, acc);
            } else {
                acc += v;
            }
        }
        work[id] = (acc.x + acc.y) + (acc.z + acc.w);
    } else {
        let base = grp * p.m;
        var acc = 0.0;
        for (var u = part; u < p.m; u += p.parts) {
            let v = scalar_at(base + u);
            if SQ {
                let d = v - mean;
                acc = fma(d, d, acc);
            } else {
                acc += v;
            }
        }
        work[id] = acc;
    }
}

@compute @workgroup_size(WG)
fn gn_stats(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
            @builtin(local_invocation_index) li: u32) {
    let grp = grid_index(wid, nwg, WG, li);
    if grp >= p.groups_total {
        return;
    }
    var s = 0.0;
    for (var i = 0u; i < p.parts; i++) {
        s += work[grp * p.parts + i];
    }
    let mean = s / f32(p.m);
    if SQ {
        work[p.stats + 2u * grp + 1u] = inverseSqrt(mean + p.eps);
    } else {
        work[p.stats + 2u * grp] = mean;
    }
}

fn affine_act(v: f32, c: u32) -> f32 {
    var r = v;
    if HAS_GAMMA {
        r *= gamma[c];
    }
    if HAS_BETA {
        r += beta[c];
    }
    return apply_act(ACT, r);
}

@compute @workgroup_size(WG)
fn gn_apply(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
            @builtin(local_invocation_index) li: u32) {
    let u = grid_index(wid, nwg, WG, li);
    if u >= p.units {
        return;
    }
    if VEC {
        let e = 4u * u;                       // first value of this unit
        let grp = e / p.m;
        let c = (grp % p.g) * p.cpg + (e % p.m) / p.s;
        let mean = work[p.stats + 2u * grp];
        let rstd = work[p.stats + 2u * grp + 1u];
        let v = (x[u] - mean) * rstd;
        y[u] = vec4<f32>(affine_act(v.x, c), affine_act(v.y, c), affine_act(v.z, c),
                         affine_act(v.w, c));
    } else {
        let grp = u / p.m;
        let c = (grp % p.g) * p.cpg + (u % p.m) / p.s;
        let mean = work[p.stats + 2u * grp];
        let rstd = work[p.stats + 2u * grp + 1u];
        y[u / 4u][u % 4u] = affine_act((scalar_at(u) - mean) * rstd, c);
    }
}

// ---- Fused backward of y = act(x̂·γ + β), x̂ = (x − mean)·rstd, for dx alone (the
// latent-optimisation case: γ and β frozen), with the statistics from gn_sum/gn_stats:
//   gy = dy·act'(x̂·γ + β),  t = gy·γ,  a = mean_group(t),  b = mean_group(t·x̂)
//   dx = rstd·(t − a − x̂·b)
// gnb_sum    per (group, part): partial sums of t and t·x̂ (P per group, interleaved as in
//            gn_sum), at `work[bwd + 2·id]`, bwd = stats + 2·N·G
// gnb_stats  per group: (a, b) at `work[bwd + 2·N·G·P + 2·grp]`
// gnb_apply  per value: dx
// One value per step (no vec4 path): these passes read x and dy once each.
@group(0) @binding(5) var<storage, read> dy: array<vec4<f32>>;       // [N, C, S], padded
@group(0) @binding(6) var<storage, read_write> dx: array<vec4<f32>>; // [N, C, S], padded

fn dy_at(e: u32) -> f32 {
    return dy[e / 4u][e % 4u];
}

fn gamma_at(c: u32) -> f32 {
    if HAS_GAMMA {
        return gamma[c];
    }
    return 1.0;
}

// (t, x̂) of value e (flat index) in group grp.
fn bwd_terms(e: u32, grp: u32) -> vec2<f32> {
    let c = (grp % p.g) * p.cpg + (e % p.m) / p.s;
    let xh = (scalar_at(e) - work[p.stats + 2u * grp]) * work[p.stats + 2u * grp + 1u];
    let gm = gamma_at(c);
    var pre = xh * gm;
    if HAS_BETA {
        pre += beta[c];
    }
    let gy = dy_at(e) * act_grad(ACT, pre);
    return vec2<f32>(gy * gm, xh);
}

@compute @workgroup_size(WG)
fn gnb_sum(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
           @builtin(local_invocation_index) li: u32) {
    let id = grid_index(wid, nwg, WG, li);
    if id >= p.groups_total * p.parts {
        return;
    }
    let grp = id / p.parts;
    let base = grp * p.m;
    var st = 0.0;
    var stx = 0.0;
    for (var u = id % p.parts; u < p.m; u += p.parts) {
        let tx = bwd_terms(base + u, grp);
        st += tx.x;
        stx = fma(tx.x, tx.y, stx);
    }
    let bwd = p.stats + 2u * p.groups_total;
    work[bwd + 2u * id] = st;
    work[bwd + 2u * id + 1u] = stx;
}

@compute @workgroup_size(WG)
fn gnb_stats(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
             @builtin(local_invocation_index) li: u32) {
    let grp = grid_index(wid, nwg, WG, li);
    if grp >= p.groups_total {
        return;
    }
    let bwd = p.stats + 2u * p.groups_total;
    var st = 0.0;
    var stx = 0.0;
    for (var i = 0u; i < p.parts; i++) {
        st += work[bwd + 2u * (grp * p.parts + i)];
        stx += work[bwd + 2u * (grp * p.parts + i) + 1u];
    }
    let ab = bwd + 2u * p.groups_total * p.parts;
    work[ab + 2u * grp] = st / f32(p.m);
    work[ab + 2u * grp + 1u] = stx / f32(p.m);
}

@compute @workgroup_size(WG)
fn gnb_apply(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
             @builtin(local_invocation_index) li: u32) {
    let e = grid_index(wid, nwg, WG, li);
    if e >= p.groups_total * p.m {
        return;
    }
    let grp = e / p.m;
    let tx = bwd_terms(e, grp);
    let ab = p.stats + 2u * p.groups_total + 2u * p.groups_total * p.parts + 2u * grp;
    let rstd = work[p.stats + 2u * grp + 1u];
    dx[e / 4u][e % 4u] = rstd * (tx.x - work[ab] - tx.y * work[ab + 1u]);
}
