// Backward of the fused attention (FlashAttention-2 style) on strided q/k/v, so that the
// [B, T, H*D] layout of the projections is read and written in place. The forward
// (attention.wgsl with LSE) kept only the output O and the log-sum-exp L of each query's
// scaled scores; the probabilities are recomputed here, one tile at a time:
//   s_ij = scale * q_i . k_j        P_ij = exp(s_ij - L_i)   (0 past the causal mask)
//   D_i = dO_i . O_i                                         (attn_bwd_delta)
//   dV_j = sum_i P_ij dO_i                                   (attn_bwd_kv)
//   dP_ij = dO_i . v_j,  dS_ij = P_ij (dP_ij - D_i)
//   dK_j = scale * sum_i dS_ij q_i                           (attn_bwd_kv)
//   dQ_i = scale * sum_j dS_ij k_j                           (attn_bwd_q)
// exp(s - L) <= 1 up to rounding however large the scores are, so nothing overflows.
//
// No float atomics: attn_bwd_kv gives each invocation one key j and walks the queries,
// attn_bwd_q gives each invocation one query i and walks the keys. The rows every
// invocation of a workgroup walks (q and dO rows for attn_bwd_kv, k and v rows for
// attn_bwd_q) are staged in workgroup memory, ROWS at a time (ROWS * D4 <= TILE4), and the
// invocation's own rows and accumulators live in private arrays of up to 512 values, as in
// attn. The walked range may be cut into SPLITS (wid.z), each writing partial sums
// [splits, B*H*T, D] that attn_bwd_sum adds in split order: this bounds the loop
// iterations of one invocation (llvmpipe stops loops after 65,535, ops::CPU_LOOP_LIMIT)
// and keeps the result deterministic.
//
// q, k and v (and the gradients dQ, dK, dV, written with the same strides and offsets) may
// share one buffer: the fused QKV projection's [B, T, 3*H*D] rows [q | k | v] are read in
// place and its gradient [B, T, 3*H*D] is written in place, so the input gradient is one
// product with the packed weight. O and dO have strides of their own (o_s, no offset).

struct Params {
    heads: u32,    // H
    tq: u32,
    tk: u32,
    d: u32,        // head dim (<= 512)
    rows: u32,     // rows per workgroup tile (ROWS * D4 <= TILE4)
    span: u32,     // walked rows per split: queries (attn_bwd_kv) or keys (attn_bwd_q)
    splits: u32,
    bh0: u32,      // first batch*head of this dispatch
    scale: f32,
    bh: u32,       // B*H
    q_sb: u32, q_sh: u32, q_st: u32,   // q and dQ strides: batch, head, token
    k_sb: u32, k_sh: u32, k_st: u32,   // k, v, dK and dV strides (attn_bwd_sum: the output's)
    o_sb: u32, o_sh: u32, o_st: u32,   // O and dO strides
    q_off: u32,    // element offset of q and dQ in their buffers
    k_off: u32,    // of k and dK (attn_bwd_sum: of the output)
    v_off: u32,    // of v and dV
    _pad0: u32, _pad1: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
// attn_bwd_kv and attn_bwd_q:
@group(0) @binding(1) var<storage, read> q: array<f32>;      // by q strides from q_off
@group(0) @binding(2) var<storage, read> k: array<f32>;      // by k strides from k_off
@group(0) @binding(3) var<storage, read> v: array<f32>;      // by k strides from v_off
@group(0) @binding(4) var<storage, read> dout: array<f32>;   // dO, by o strides
@group(0) @binding(5) var<storage, read> lse: array<f32>;    // L: [B*H*Tq]
@group(0) @binding(6) var<storage, read> delta: array<f32>;  // D: [B*H*Tq]
// attn_bwd_kv: dK; attn_bwd_q: dQ. By k (q) strides from k_off (q_off), or partials
// [splits, B*H*T, D].
@group(0) @binding(7) var<storage, read_write> grad_a: array<f32>;
// attn_bwd_kv: dV, like dK from v_off.
@group(0) @binding(8) var<storage, read_write> grad_b: array<f32>;

override WG: u32 = 8u;           // invocations (keys or queries) per workgroup
override CAUSAL: bool = false;
override SPLIT: bool = false;
override D_MULT4: bool = true;   // D % 4 == 0: no masking of the last vec4
override D4: u32 = 16u;          // ceil(D / 4): a constant loop bound

const DMAX4: u32 = 128u;         // 512 / 4
// Two tiles of TILE4 vec4s: 16 KiB, the WebGPU minimum of workgroup storage.
const TILE4: u32 = 512u;
var<workgroup> ta: array<vec4<f32>, TILE4>;   // attn_bwd_kv: q rows; attn_bwd_q: k rows
var<workgroup> tb: array<vec4<f32>, TILE4>;   // attn_bwd_kv: dO rows; attn_bwd_q: v rows

// Four values of a row starting at `base`, from dim 4c; dims past D read as 0
// (shaders/lib/head_row.wgsl).
fn ld_q(base: u32, c: u32) -> vec4<f32> {
    let i = row4_at(base, c);
    return row4_mask(c, vec4<f32>(q[i.x], q[i.y], q[i.z], q[i.w]));
}
fn ld_k(base: u32, c: u32) -> vec4<f32> {
    let i = row4_at(base, c);
    return row4_mask(c, vec4<f32>(k[i.x], k[i.y], k[i.z], k[i.w]));
}
fn ld_v(base: u32, c: u32) -> vec4<f32> {
    let i = row4_at(base, c);
    return row4_mask(c, vec4<f32>(v[i.x], v[i.y], v[i.z], v[i.w]));
}
fn ld_do(base: u32, c: u32) -> vec4<f32> {
    let i = row4_at(base, c);
    return row4_mask(c, vec4<f32>(dout[i.x], dout[i.y], dout[i.z], dout[i.w]));
}

// Where row `t` of (b, h) goes: the strided tensor, or its split's partial row.
fn out_base(b: u32, h: u32, bh: u32, t: u32, ntok: u32, split: u32,
            sb: u32, sh: u32, st: u32) -> u32 {
    if SPLIT {
        return ((split * p.bh + bh) * ntok + t) * p.d;
    }
    return b * sb + h * sh + t * st;
}

@compute @workgroup_size(WG)
fn attn_bwd_kv(@builtin(workgroup_id) wid: vec3<u32>,
               @builtin(local_invocation_index) li: u32) {
    let bh = wid.y + p.bh0;
    let b = bh / p.heads;
    let h = bh % p.heads;
    let j = wid.x * WG + li;                  // this invocation's key
    let jc = min(j, p.tk - 1u);
    let split = wid.z;
    let d4 = D4;

    var kj: array<vec4<f32>, DMAX4>;
    var vj: array<vec4<f32>, DMAX4>;
    var dk: array<vec4<f32>, DMAX4>;
    var dv: array<vec4<f32>, DMAX4>;
    let kbase = b * p.k_sb + h * p.k_sh + jc * p.k_st;
    for (var c = 0u; c < d4; c++) {
        kj[c] = ld_k(kbase + p.k_off, c) * p.scale;
        vj[c] = ld_v(kbase + p.v_off, c);
        dk[c] = vec4<f32>(0.0);
        dv[c] = vec4<f32>(0.0);
    }

    // Queries of this split; with a causal mask those before the workgroup's first key see
    // none of its keys, and each invocation masks the queries before its own key.
    var i0 = split * p.span;
    let i1 = min(i0 + p.span, p.tq);
    if CAUSAL {
        i0 = max(i0, wid.x * WG);
    }
    let qb = p.q_off + b * p.q_sb + h * p.q_sh;
    let ob0 = b * p.o_sb + h * p.o_sh;
    let rows = p.rows;
    for (var t0 = i0; t0 < i1; t0 += rows) {
        // Stage q and dO rows t0.. (past i1: the last row again, never read below).
        for (var e = li; e < rows * d4; e += WG) {
            let r = e / d4;
            let t = min(t0 + r, i1 - 1u);
            ta[e] = ld_q(qb + t * p.q_st, e % d4);
            tb[e] = ld_do(ob0 + t * p.o_st, e % d4);
        }
        workgroupBarrier();
        let n = min(rows, i1 - t0);
        for (var r = 0u; r < n; r++) {
            let i = t0 + r;
            let row = r * d4;
            var s = 0.0;
            var dp = 0.0;
            for (var c = 0u; c < d4; c++) {
                s += dot(ta[row + c], kj[c]);
                dp += dot(tb[row + c], vj[c]);
            }
            var pr = exp(s - lse[bh * p.tq + i]);
            if CAUSAL {
                pr = select(pr, 0.0, j > i);
            }
            let ds = pr * (dp - delta[bh * p.tq + i]);
            for (var c = 0u; c < d4; c++) {
                dv[c] = fma(vec4<f32>(pr), tb[row + c], dv[c]);
                dk[c] = fma(vec4<f32>(ds), ta[row + c], dk[c]);
            }
        }
        workgroupBarrier();
    }
    if j >= p.tk {
        return;
    }
    let ob = out_base(b, h, bh, j, p.tk, split, p.k_sb, p.k_sh, p.k_st);
    // Split partials are dense; the final gradients sit at dK's and dV's offsets.
    let oa = select(ob + p.k_off, ob, SPLIT);
    let ov = select(ob + p.v_off, ob, SPLIT);
    for (var c = 0u; c < d4; c++) {
        let d = 4u * c;
        // dK = scale * sum_i dS_ij q_i (kj was pre-scaled for the scores only).
        let a = dk[c] * p.scale;
        let w = dv[c];
        if D_MULT4 || d < p.d { grad_a[oa + d] = a.x; grad_b[ov + d] = w.x; }
        if D_MULT4 || d + 1u < p.d { grad_a[oa + d + 1u] = a.y; grad_b[ov + d + 1u] = w.y; }
        if D_MULT4 || d + 2u < p.d { grad_a[oa + d + 2u] = a.z; grad_b[ov + d + 2u] = w.z; }
        if D_MULT4 || d + 3u < p.d { grad_a[oa + d + 3u] = a.w; grad_b[ov + d + 3u] = w.w; }
    }
}

@compute @workgroup_size(WG)
fn attn_bwd_q(@builtin(workgroup_id) wid: vec3<u32>,
              @builtin(local_invocation_index) li: u32) {
    let bh = wid.y + p.bh0;
    let b = bh / p.heads;
    let h = bh % p.heads;
    let i = wid.x * WG + li;                  // this invocation's query
    let ic = min(i, p.tq - 1u);
    let split = wid.z;
    let d4 = D4;

    var qi: array<vec4<f32>, DMAX4>;
    var doi: array<vec4<f32>, DMAX4>;
    var dq: array<vec4<f32>, DMAX4>;
    let qbase = p.q_off + b * p.q_sb + h * p.q_sh + ic * p.q_st;
    let obase = b * p.o_sb + h * p.o_sh + ic * p.o_st;
    for (var c = 0u; c < d4; c++) {
        qi[c] = ld_q(qbase, c) * p.scale;
        doi[c] = ld_do(obase, c);
        dq[c] = vec4<f32>(0.0);
    }
    let lse_i = lse[bh * p.tq + ic];
    let di = delta[bh * p.tq + ic];

    // Keys of this split; with a causal mask the workgroup's last query bounds them.
    let j0 = split * p.span;
    var j1 = min(j0 + p.span, p.tk);
    if CAUSAL {
        j1 = min(j1, min(wid.x * WG + WG, p.tq));
    }
    let kb = b * p.k_sb + h * p.k_sh;
    let rows = p.rows;
    for (var t0 = j0; t0 < j1; t0 += rows) {
        for (var e = li; e < rows * d4; e += WG) {
            let r = e / d4;
            let base = kb + min(t0 + r, j1 - 1u) * p.k_st;
            ta[e] = ld_k(base + p.k_off, e % d4);
            tb[e] = ld_v(base + p.v_off, e % d4);
        }
        workgroupBarrier();
        let n = min(rows, j1 - t0);
        for (var r = 0u; r < n; r++) {
            let j = t0 + r;
            let row = r * d4;
            var s = 0.0;
            var dp = 0.0;
            for (var c = 0u; c < d4; c++) {
                s += dot(qi[c], ta[row + c]);
                dp += dot(doi[c], tb[row + c]);
            }
            var pr = exp(s - lse_i);
            if CAUSAL {
                pr = select(pr, 0.0, j > i);
            }
            let ds = pr * (dp - di);
            for (var c = 0u; c < d4; c++) {
                dq[c] = fma(vec4<f32>(ds), ta[row + c], dq[c]);
            }
        }
        workgroupBarrier();
    }
    if i >= p.tq {
        return;
    }
    var ob = out_base(b, h, bh, i, p.tq, split, p.q_sb, p.q_sh, p.q_st);
    if !SPLIT {
        ob += p.q_off;   // split partials are dense
    }
    for (var c = 0u; c < d4; c++) {
        let d = 4u * c;
        let a = dq[c] * p.scale;
        if D_MULT4 || d < p.d { grad_a[ob + d] = a.x; }
        if D_MULT4 || d + 1u < p.d { grad_a[ob + d + 1u] = a.y; }
        if D_MULT4 || d + 2u < p.d { grad_a[ob + d + 2u] = a.z; }
        if D_MULT4 || d + 3u < p.d { grad_a[ob + d + 3u] = a.w; }
    }
}

override WGE: u32 = 64u;         // invocations per workgroup of the elementwise passes

// attn_bwd_delta: D_i = dO_i . O_i, one invocation per query row.
@group(0) @binding(1) var<storage, read> delta_do: array<f32>;          // dO, by o strides
@group(0) @binding(2) var<storage, read> delta_o: array<f32>;           // O, by o strides
@group(0) @binding(3) var<storage, read_write> delta_out: array<f32>;   // D: [B*H*Tq]

@compute @workgroup_size(WGE)
fn attn_bwd_delta(@builtin(workgroup_id) wid: vec3<u32>,
                  @builtin(num_workgroups) nwg: vec3<u32>,
                  @builtin(local_invocation_index) li: u32) {
    let row = grid_index(wid, nwg, WGE, li);
    if row >= p.bh * p.tq {
        return;
    }
    let bh = row / p.tq;
    let base = (bh / p.heads) * p.o_sb + (bh % p.heads) * p.o_sh + (row % p.tq) * p.o_st;
    var acc = 0.0;
    for (var d = 0u; d < p.d; d++) {
        acc = fma(delta_do[base + d], delta_o[base + d], acc);
    }
    delta_out[row] = acc;
}

// attn_bwd_sum: adds the split partials [splits, B*H*T, D] in split order into the strided
// output (T = p.tk, strides k_s, offset k_off), one invocation per value.
@group(0) @binding(1) var<storage, read> sum_part: array<f32>;
@group(0) @binding(2) var<storage, read_write> sum_out: array<f32>;

@compute @workgroup_size(WGE)
fn attn_bwd_sum(@builtin(workgroup_id) wid: vec3<u32>,
                @builtin(num_workgroups) nwg: vec3<u32>,
                @builtin(local_invocation_index) li: u32) {
    let e = grid_index(wid, nwg, WGE, li);
    let n = p.bh * p.tk * p.d;
    if e >= n {
        return;
    }
    var acc = 0.0;
    for (var s = 0u; s < p.splits; s++) {
        acc += sum_part[s * n + e];
    }
    let row = e / p.d;
    let bh = row / p.tk;
    let t = row % p.tk;
    sum_out[p.k_off + (bh / p.heads) * p.k_sb + (bh % p.heads) * p.k_sh + t * p.k_st + e % p.d]
        = acc;
}
