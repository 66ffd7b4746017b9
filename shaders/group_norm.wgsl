// GroupNorm, as torch.nn.GroupNorm, with an optional fused activation:
//   y = act((x - mean_g) / sqrt(var_g + eps) * gamma[c] + beta[c])
// over x [N, C, S] (S = H*W, or L), groups of C/G consecutive channels, so each group is
// one contiguous run of M = C/G * S values. Biased variance. Deterministic, no atomics.
//
// One dispatch per direction (gn_fused, gnb_fused): a workgroup of 256 per group computes
// the statistics (Welford per invocation, merged by Chan's formula in a tree through
// workgroup memory: 9 barriers) and then applies them, reading the group again while it is
// still in cache. VQGAN norms have 32 groups per image, enough workgroups for a CPU
// adapter's cores and, each group being one contiguous run, for a GPU's memory system.
//
// Groups longer than one workgroup's loop cap take the multi-dispatch path, no barriers.
// Forward, three dispatches, x read twice:
//   gn_partial  one read of x: P partials per group, partial p over units p, p+P, ..,
//               each a Welford (mean, M2) pair (M2 = Σ (x - mean)²), so no second pass
//               over x is needed for a stable variance
//   gn_stats    per group: the partials merged (Chan et al.) into (mean, rstd)
//   gn_apply    one invocation per unit: normalise, affine, activation
// The (mean, rstd) pairs stay in `stats` for the backward, which does not recompute them.
// A unit is a vec4 when VEC (S % 4 == 0: groups and channels start on 16-byte boundaries),
// else one value. Interleaved partials make neighbouring invocations read neighbouring
// units (coalesced on GPUs); each partial covers at most 1,024 units (llvmpipe stops loops
// after 65,535 iterations; see ops::CPU_LOOP_LIMIT).
//
// Bindings: every entry uses a prefix of them (the host binds in order).

struct Params {
    groups_total: u32,  // N * G
    g: u32,             // G
    cpg: u32,           // channels per group
    s: u32,             // spatial size S
    m: u32,             // values per group, C/G * S
    parts: u32,         // P, partials per group
    stats: u32,         // offset of the per-group pairs in binding 1: 2 * N*G*P
    eps: f32,
    units: u32,         // units in all of x
    n: u32,             // N (gnb_params)
    c: u32,             // C (gnb_params)
    _pad: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
// [N*G*P, 2] partial pairs, then [N*G, 2] per-group pairs from `stats` on: (mean, rstd)
// in the forward's buffer; in the backward's own buffer (binding 1 of its gn_stats, binding
// 6 elsewhere) the (Σt, Σt·x̂) partials and then (a, b).
@group(0) @binding(1) var<storage, read_write> work: array<f32>;
@group(0) @binding(2) var<storage, read> x: array<vec4<f32>>;       // [N, C, S], padded to vec4
@group(0) @binding(3) var<storage, read> gamma: array<f32>;         // [C] (if HAS_GAMMA)
@group(0) @binding(4) var<storage, read> beta: array<f32>;          // [C] (if HAS_BETA)
@group(0) @binding(5) var<storage, read_write> y: array<vec4<f32>>; // [N, C, S], padded

override VEC: bool = true;
// gn_stats: merge the backward's (Σt, Σt·x̂) partials into means instead.
override BWD: bool = false;
override HAS_GAMMA: bool = false;
override HAS_BETA: bool = false;
override ACT: u32 = 0u;
override WG: u32 = 64u;

fn scalar_at(e: u32) -> f32 {
    return x[e / 4u][e % 4u];
}

// Units per group and the number partial `part` of a group covers.
fn group_units() -> u32 {
    if VEC {
        return p.m / 4u;
    }
    return p.m;
}

fn part_count(part: u32) -> u32 {
    return (group_units() - part + p.parts - 1u) / p.parts;
}

@compute @workgroup_size(WG)
fn gn_partial(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
              @builtin(local_invocation_index) li: u32) {
    let id = grid_index(wid, nwg, WG, li);
    if id >= p.groups_total * p.parts {
        return;
    }
    let grp = id / p.parts;
    let w = welford(grp * group_units(), id % p.parts, p.parts);
    work[2u * id] = w.y;
    work[2u * id + 1u] = w.z;
}

// (count, mean, M2) of the group's units first, first + step, .. from `base` on: Welford per
// lane (every lane of a vec4 unit sees the same count), then the lanes merged: equal counts
// k make the merge M2 = Σ M2_l + k·Σ (mean_l − mean)².
fn welford(base: u32, first: u32, step: u32) -> vec3<f32> {
    var mean = vec4<f32>(0.0);
    var m2 = vec4<f32>(0.0);
    var k = 0.0;
    for (var u = first; u < group_units(); u += step) {
        var v: vec4<f32>;
        if VEC {
            v = x[base + u];
        } else {
            v = vec4<f32>(scalar_at(base + u));
        }
        k += 1.0;
        let d = v - mean;
        mean = fma(d, vec4<f32>(1.0 / k), mean);
        m2 = fma(d, v - mean, m2);
    }
    if VEC {
        let mp = ((mean.x + mean.y) + (mean.z + mean.w)) * 0.25;
        let dm = mean - mp;
        return vec3<f32>(4.0 * k, mp, ((m2.x + m2.y) + (m2.z + m2.w)) + k * dot(dm, dm));
    }
    return vec3<f32>(k, mean.x, m2.x);
}

@compute @workgroup_size(WG)
fn gn_stats(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
            @builtin(local_invocation_index) li: u32) {
    let grp = grid_index(wid, nwg, WG, li);
    if grp >= p.groups_total {
        return;
    }
    let out = p.stats + 2u * grp;
    if BWD {
        var st = 0.0;
        var stx = 0.0;
        for (var i = 0u; i < p.parts; i++) {
            st += work[2u * (grp * p.parts + i)];
            stx += work[2u * (grp * p.parts + i) + 1u];
        }
        work[out] = st / f32(p.m);
        work[out + 1u] = stx / f32(p.m);
        return;
    }
    // Chan et al.'s pairwise merge, one partial at a time.
    var count = 0.0;
    var mean = 0.0;
    var m2 = 0.0;
    let lanes = select(1.0, 4.0, VEC);
    for (var i = 0u; i < p.parts; i++) {
        let nb = lanes * f32(part_count(i));
        let mb = work[2u * (grp * p.parts + i)];
        let total = count + nb;
        let d = mb - mean;
        mean = fma(d, nb / total, mean);
        m2 += work[2u * (grp * p.parts + i) + 1u] + d * d * (count * nb / total);
        count = total;
    }
    work[out] = mean;
    work[out + 1u] = inverseSqrt(m2 / f32(p.m) + p.eps);
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
    var grp = u / p.m;
    if VEC {
        grp = 4u * u / p.m;
    }
    normalise_unit(u, grp, work[p.stats + 2u * grp], work[p.stats + 2u * grp + 1u]);
}

// y at unit u (a flat unit index) of group grp, from the group's mean and rstd.
fn normalise_unit(u: u32, grp: u32, mean: f32, rstd: f32) {
    if VEC {
        let e = 4u * u;                       // first value of this unit
        let c = (grp % p.g) * p.cpg + (e % p.m) / p.s;
        let v = (x[u] - mean) * rstd;
        y[u] = vec4<f32>(affine_act(v.x, c), affine_act(v.y, c), affine_act(v.z, c),
                         affine_act(v.w, c));
    } else {
        let c = (grp % p.g) * p.cpg + (u % p.m) / p.s;
        y[u / 4u][u % 4u] = affine_act((scalar_at(u) - mean) * rstd, c);
    }
}

// ---- Fused backward of y = act(x̂·γ + β), x̂ = (x − mean)·rstd, with the forward's
// (mean, rstd) in binding 1:
//   gy = dy·act'(x̂·γ + β),  t = gy·γ,  a = mean_group(t),  b = mean_group(t·x̂)
//   dx = rstd·(t − a − x̂·b)
//   dγ[c] = Σ_{n,s} gy·x̂,  dβ[c] = Σ_{n,s} gy   (gnb_params, training only)
// gnb_sum    per (group, part): partial sums of t and t·x̂ into `bwork` (interleaved as in
//            gn_partial); then gn_stats with BWD over `bwork` gives (a, b) per group
// gnb_apply  per unit: dx
// gnb_params per channel: dγ, dβ
// x and dy are read as vec4 units when VEC, as in the forward.
@group(0) @binding(5) var<storage, read> dy: array<vec4<f32>>;        // [N, C, S], padded
@group(0) @binding(6) var<storage, read_write> bwork: array<f32>;     // as `work`
@group(0) @binding(6) var<storage, read_write> pg: array<f32>;        // [2, C]: dγ then dβ
@group(0) @binding(7) var<storage, read_write> dx: array<vec4<f32>>;  // [N, C, S], padded

fn gamma_at(c: u32) -> f32 {
    if HAS_GAMMA {
        return gamma[c];
    }
    return 1.0;
}

fn act_grad4(v: vec4<f32>) -> vec4<f32> {
    if ACT == 0u {
        return vec4<f32>(1.0);
    }
    return vec4<f32>(act_grad(ACT, v.x), act_grad(ACT, v.y), act_grad(ACT, v.z),
                     act_grad(ACT, v.w));
}

// The unit at `u` (a flat unit index) of group grp: (gy, x̂) for its 1 or 4 values (only
// .x meaningful when !VEC), and its channel.
struct Terms {
    gy: vec4<f32>,
    xh: vec4<f32>,
    c: u32,
}

fn terms(u: u32, grp: u32) -> Terms {
    var e = u;
    var xv: vec4<f32>;
    var dv: vec4<f32>;
    if VEC {
        e = 4u * u;
        xv = x[u];
        dv = dy[u];
    } else {
        xv = vec4<f32>(scalar_at(u));
        dv = vec4<f32>(dy[u / 4u][u % 4u]);
    }
    let c = (grp % p.g) * p.cpg + (e % p.m) / p.s;
    let xh = (xv - work[p.stats + 2u * grp]) * work[p.stats + 2u * grp + 1u];
    var pre = xh * gamma_at(c);
    if HAS_BETA {
        pre += beta[c];
    }
    return Terms(dv * act_grad4(pre), xh, c);
}

@compute @workgroup_size(WG)
fn gnb_sum(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
           @builtin(local_invocation_index) li: u32) {
    let id = grid_index(wid, nwg, WG, li);
    if id >= p.groups_total * p.parts {
        return;
    }
    let grp = id / p.parts;
    let units = group_units();
    var st = vec4<f32>(0.0);
    var stx = vec4<f32>(0.0);
    for (var u = id % p.parts; u < units; u += p.parts) {
        let tm = terms(grp * units + u, grp);
        let t = tm.gy * gamma_at(tm.c);
        st += t;
        stx = fma(t, tm.xh, stx);
    }
    if VEC {
        bwork[2u * id] = (st.x + st.y) + (st.z + st.w);
        bwork[2u * id + 1u] = (stx.x + stx.y) + (stx.z + stx.w);
    } else {
        bwork[2u * id] = st.x;
        bwork[2u * id + 1u] = stx.x;
    }
}

@compute @workgroup_size(WG)
fn gnb_apply(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
             @builtin(local_invocation_index) li: u32) {
    let u = grid_index(wid, nwg, WG, li);
    if u >= p.units {
        return;
    }
    var grp = u / p.m;
    if VEC {
        grp = 4u * u / p.m;
    }
    let tm = terms(u, grp);
    let ab = p.stats + 2u * grp;
    let rstd = work[p.stats + 2u * grp + 1u];
    let d = rstd * (tm.gy * gamma_at(tm.c) - bwork[ab] - tm.xh * bwork[ab + 1u]);
    if VEC {
        dx[u] = d;
    } else {
        dx[u / 4u][u % 4u] = d.x;
    }
}

@compute @workgroup_size(WG)
fn gnb_params(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
              @builtin(local_invocation_index) li: u32) {
    let c = grid_index(wid, nwg, WG, li);
    if c >= p.c {
        return;
    }
    // Units of channel c in one image; chunks of at most 1,024 keep each loop under
    // llvmpipe's cap whatever N·S is.
    var per = p.s;
    if VEC {
        per = p.s / 4u;
    }
    var sg = vec4<f32>(0.0);
    var sgx = vec4<f32>(0.0);
    for (var n = 0u; n < p.n; n++) {
        let grp = n * p.g + c / p.cpg;
        let first = (n * p.c + c) * per;
        for (var c0 = 0u; c0 < per; c0 += 1024u) {
            for (var u = c0; u < min(per, c0 + 1024u); u++) {
                let tm = terms(first + u, grp);
                sg += tm.gy;
                sgx = fma(tm.gy, tm.xh, sgx);
            }
        }
    }
    if VEC {
        pg[c] = (sgx.x + sgx.y) + (sgx.z + sgx.w);
        pg[p.c + c] = (sg.x + sg.y) + (sg.z + sg.w);
    } else {
        pg[c] = sgx.x;
        pg[p.c + c] = sg.x;
    }
}

// ---- One dispatch per direction: a workgroup of GN_WG per group (grid_group is the group).
const GN_WG: u32 = 256u;
var<workgroup> red_n: array<f32, 256>;
var<workgroup> red_a: array<f32, 256>;
var<workgroup> red_b: array<f32, 256>;
// gnb_fused's dx (binding 6: it has no partials buffer).
@group(0) @binding(6) var<storage, read_write> dx_one: array<vec4<f32>>;  // [N, C, S], padded

// Merges slot j into slot i: (count, mean, M2) by Chan's formula, or (count, Σ, Σ) sums.
fn red_merge(i: u32, j: u32, welford: bool) {
    if !welford {
        red_a[i] += red_a[j];
        red_b[i] += red_b[j];
        return;
    }
    let na = red_n[i];
    let nb = red_n[j];
    let total = na + nb;
    if nb == 0.0 {
        return;
    }
    let d = red_a[j] - red_a[i];
    red_a[i] = fma(d, nb / total, red_a[i]);
    red_b[i] += red_b[j] + d * d * (na * nb / total);
    red_n[i] = total;
}

// The tree over the 256 slots; every invocation of the workgroup calls it.
fn red_tree(li: u32, welford: bool) {
    workgroupBarrier();
    for (var s = GN_WG / 2u; s > 0u; s >>= 1u) {
        if li < s {
            red_merge(li, li + s, welford);
        }
        workgroupBarrier();
    }
}

@compute @workgroup_size(256)
fn gn_fused(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
            @builtin(local_invocation_index) li: u32) {
    let grp = grid_group(wid, nwg);
    // Uniform over the workgroup: no barrier is skipped by part of it.
    if grp >= p.groups_total {
        return;
    }
    let units = group_units();
    let base = grp * units;
    let w = welford(base, li, GN_WG);
    red_n[li] = w.x;
    red_a[li] = w.y;
    red_b[li] = w.z;
    red_tree(li, true);
    let mu = red_a[0];
    let rstd = inverseSqrt(red_b[0] / f32(p.m) + p.eps);
    if li == 0u {
        work[p.stats + 2u * grp] = mu;
        work[p.stats + 2u * grp + 1u] = rstd;
    }
    for (var u = li; u < units; u += GN_WG) {
        normalise_unit(base + u, grp, mu, rstd);
    }
}

@compute @workgroup_size(256)
fn gnb_fused(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
             @builtin(local_invocation_index) li: u32) {
    let grp = grid_group(wid, nwg);
    if grp >= p.groups_total {
        return;
    }
    let units = group_units();
    let base = grp * units;
    var st = vec4<f32>(0.0);
    var stx = vec4<f32>(0.0);
    for (var u = li; u < units; u += GN_WG) {
        let tm = terms(base + u, grp);
        let t = tm.gy * gamma_at(tm.c);
        st += t;
        stx = fma(t, tm.xh, stx);
    }
    if VEC {
        red_a[li] = (st.x + st.y) + (st.z + st.w);
        red_b[li] = (stx.x + stx.y) + (stx.z + stx.w);
    } else {
        red_a[li] = st.x;
        red_b[li] = stx.x;
    }
    red_tree(li, false);
    let a = red_a[0] / f32(p.m);
    let b = red_b[0] / f32(p.m);
    let rstd = work[p.stats + 2u * grp + 1u];
    for (var u = li; u < units; u += GN_WG) {
        let tm = terms(base + u, grp);
        let d = rstd * (tm.gy * gamma_at(tm.c) - a - tm.xh * b);
        if VEC {
            dx_one[base + u] = d;
        } else {
            let e = base + u;
            dx_one[e / 4u][e % 4u] = d.x;
        }
    }
}
