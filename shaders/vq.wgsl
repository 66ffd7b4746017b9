// Vector quantisation against a codebook E [K, D], for z in NCHW layout.
//
//   code_norms       ee[k] = sum_d E[k, d]^2                                 one invocation per code
//   nearest_partial  per (position, chunk of CHUNK codes; chunk = workgroup y): the code minimising
//                    dist = (||z||^2 + ||e||^2) - 2 z.e, lowest index on ties  one invocation each
//   nearest_reduce   per position: the best of its chunks' (distance, code) pairs, lowest code
//                    on ties whatever order the chunks come in (the distance matmul's fused
//                    ARGMIN epilogue writes interleaved column blocks). Deterministic: no
//                    atomics.
//   scores_partial   the same per-chunk minima over precomputed scores [M, K] (a matmul's
//                    ||e||^2 - 2 z.e: the distance less ||z||^2, constant per row); one
//                    invocation per (position, chunk of CHUNK codes); then nearest_reduce
// The per-chunk minima are pairs [M, chunks, 2]: the distance, then the code's bits.
//   gather           z_q[n, d, s] = E[codes[n, s], d]
//   argmax_channels  per position: the channel with the largest value, lowest index on ties
// Position m = (n, s), s = y * W + x, reads z[(n * D + d) * HW + s].
//
// Each entry point uses its own bindings 1..k (WGSL allows variables to share a binding
// number when no entry point uses both).

struct Params {
    m: u32,          // positions N * H * W
    hw: u32,         // H * W
    d: u32,          // vector length (channels)
    k: u32,          // codebook entries (channels for argmax_channels)
    chunks: u32,     // ceil(K / CHUNK)
    total: u32,      // output elements of gather
    _pad0: u32,
    _pad1: u32,
}

@group(0) @binding(0) var<uniform> p: Params;

const WG: u32 = 64u;
override CHUNK: u32 = 256u;

fn first_of(m: u32) -> u32 {
    // Offset of position m's first channel in an NCHW tensor of D channels.
    return (m / p.hw) * p.d * p.hw + m % p.hw;
}

// ---- code_norms
@group(0) @binding(1) var<storage, read> cn_e: array<f32>;            // [K, D]
@group(0) @binding(2) var<storage, read_write> cn_ee: array<f32>;     // [K]

@compute @workgroup_size(64, 1, 1)
fn code_norms(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
              @builtin(local_invocation_index) li: u32) {
    let k = grid_index(wid, nwg, WG, li);
    if k >= p.k {
        return;
    }
    var s = 0.0;
    for (var d = 0u; d < p.d; d++) {
        let v = cn_e[k * p.d + d];
        s = fma(v, v, s);
    }
    cn_ee[k] = s;
}

// ---- nearest_partial
@group(0) @binding(1) var<storage, read> np_z: array<f32>;            // [N, D, H, W]
@group(0) @binding(2) var<storage, read> np_e: array<f32>;            // [K, D]
@group(0) @binding(3) var<storage, read> np_ee: array<f32>;           // [K]
@group(0) @binding(4) var<storage, read_write> np_pairs: array<f32>;  // [M, chunks, 2]

@compute @workgroup_size(64, 1, 1)
fn nearest_partial(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                   @builtin(local_invocation_index) li: u32) {
    // Positions along x (folded into z past 65,535 workgroups), chunks along y: the chunk is
    // the same for the whole workgroup, so the codebook reads are uniform loads.
    let m = (wid.x + wid.z * nwg.x) * WG + li;
    let c = wid.y;
    if m >= p.m {
        return;
    }
    let t = m * p.chunks + c;
    let zb = first_of(m);
    var zz = 0.0;
    for (var d = 0u; d < p.d; d++) {
        let v = np_z[zb + d * p.hw];
        zz = fma(v, v, zz);
    }
    let k0 = c * CHUNK;
    let k1 = min(k0 + CHUNK, p.k);
    var best = bitcast<f32>(0x7f800000u);   // +inf
    var best_k = k0;
    for (var k = k0; k < k1; k++) {
        var dot = 0.0;
        let eb = k * p.d;
        for (var d = 0u; d < p.d; d++) {
            dot = fma(np_z[zb + d * p.hw], np_e[eb + d], dot);
        }
        let dist = (zz + np_ee[k]) - 2.0 * dot;
        if dist < best {
            best = dist;
            best_k = k;
        }
    }
    np_pairs[2u * t] = best;
    np_pairs[2u * t + 1u] = bitcast<f32>(best_k);
}

// ---- nearest_reduce
@group(0) @binding(1) var<storage, read> nr_pairs: array<f32>;        // [M, chunks, 2]
@group(0) @binding(2) var<storage, read_write> nr_codes: array<u32>;  // [M]

@compute @workgroup_size(64, 1, 1)
fn nearest_reduce(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                  @builtin(local_invocation_index) li: u32) {
    let m = grid_index(wid, nwg, WG, li);
    if m >= p.m {
        return;
    }
    // A chunk with no code (0xffffffff: only NaN distances, or none) never wins; a position
    // whose chunks all say so gets code 0, as the direct search gives it.
    var best = bitcast<f32>(0x7f800000u);   // +inf
    var best_k = 0xffffffffu;
    for (var c = 0u; c < p.chunks; c++) {
        let v = nr_pairs[2u * (m * p.chunks + c)];
        let k = bitcast<u32>(nr_pairs[2u * (m * p.chunks + c) + 1u]);
        if v < best || (v == best && k < best_k) {
            best = v;
            best_k = k;
        }
    }
    nr_codes[m] = select(best_k, 0u, best_k == 0xffffffffu);
}

// ---- scores_partial
@group(0) @binding(1) var<storage, read> sp_scores: array<f32>;       // [M, K]
@group(0) @binding(2) var<storage, read_write> sp_pairs: array<f32>;  // [M, chunks, 2]

@compute @workgroup_size(64, 1, 1)
fn scores_partial(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                  @builtin(local_invocation_index) li: u32) {
    let t = grid_index(wid, nwg, WG, li);
    if t >= p.m * p.chunks {
        return;
    }
    let m = t / p.chunks;
    let k0 = (t % p.chunks) * CHUNK;
    let k1 = min(k0 + CHUNK, p.k);
    var best = bitcast<f32>(0x7f800000u);   // +inf
    var best_k = k0;
    for (var k = k0; k < k1; k++) {
        let v = sp_scores[m * p.k + k];
        if v < best {
            best = v;
            best_k = k;
        }
    }
    sp_pairs[2u * t] = best;
    sp_pairs[2u * t + 1u] = bitcast<f32>(best_k);
}

// ---- gather
@group(0) @binding(1) var<storage, read> g_codes: array<u32>;         // [N, H, W]
@group(0) @binding(2) var<storage, read> g_e: array<f32>;             // [K, D]
@group(0) @binding(3) var<storage, read_write> g_zq: array<f32>;      // [N, D, H, W]

@compute @workgroup_size(64, 1, 1)
fn gather(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
          @builtin(local_invocation_index) li: u32) {
    let i = grid_index(wid, nwg, WG, li);
    if i >= p.total {
        return;
    }
    let s = i % p.hw;
    let d = (i / p.hw) % p.d;
    let n = i / (p.hw * p.d);
    // Codes are validated on the host; the clamp only keeps a bad one inside the buffer.
    let code = min(g_codes[n * p.hw + s], p.k - 1u);
    g_zq[i] = g_e[code * p.d + d];
}

// ---- argmax_channels
@group(0) @binding(1) var<storage, read> am_x: array<f32>;            // [N, C, H, W]
@group(0) @binding(2) var<storage, read_write> am_codes: array<u32>;  // [N, H, W]

@compute @workgroup_size(64, 1, 1)
fn argmax_channels(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                   @builtin(local_invocation_index) li: u32) {
    let m = grid_index(wid, nwg, WG, li);
    if m >= p.m {
        return;
    }
    let b = first_of(m);
    var best = am_x[b];
    var best_c = 0u;
    for (var c = 1u; c < p.d; c++) {
        let v = am_x[b + c * p.hw];
        if v > best {
            best = v;
            best_c = c;
        }
    }
    am_codes[m] = best_c;
}
