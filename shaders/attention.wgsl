// Fused multi-head attention with an online softmax (flash-attention style): the Tq x Tk
// score matrix never exists in memory.
//   out[b,h,i,:] = sum_j softmax_j(scale * q[b,h,i,:] . k[b,h,j,:]) v[b,h,j,:]
// with keys j > i skipped when CAUSAL. Tensors are addressed through (batch, head, token)
// strides with a contiguous last dim, so [B, H, T, D] and [B, T, H*D] layouts both work
// without permutes.
//
// attn: a workgroup handles WGQ consecutive queries of one (batch, head), one invocation per
//   query, so every lane reads the same key and value rows: uniform loads that CPU Vulkan
//   turns into one load plus a broadcast, and that GPUs serve as broadcasts from cache. The
//   query row (pre-scaled) and the output accumulator live in private arrays of up to 512
//   values; loops over D have the constant bound D4 so that compilers can unroll them and
//   keep those arrays in registers. With D % 4 == 0 keys and values are read as vec4 (one
//   load instruction per 4 values: CPU Vulkan runs each load as a loop over the SIMD
//   lanes). Keys are taken 4 at a time: one loop over D makes 4 scores, one loop over D
//   folds 4 value rows in, with one rescale of the accumulator per 4 keys.
//   The keys may be cut into SPLITS ranges (wid.z), each written unnormalised with its
//   running max m and sum l, and merged by attn_combine; this bounds the loop iterations
//   of one invocation (llvmpipe stops loops after 65,535 iterations, see ops::CPU_LOOP_LIMIT)
//   and adds parallelism when there are few queries.
//   q, k and v may be one buffer: each has an element offset (q_off, k_off, v_off) on top of
//   its strides, so the fused QKV projection's [B, T, 3*H*D] output is read in place (row
//   stride 3*H*D, k and v starting H*D and 2*H*D values into each row).
//   q, k, v and the output are `elem` (shaders/lib/elem_f32.wgsl): f32, or f16 in the
//   f16-activation twin (`--precision f16` inference), whose scores, softmax and
//   accumulator stay f32. That twin never splits keys: its host converts to f32 first.
//   With LSE (the training forward, ops::attention_backward) the per-query log-sum-exp of
//   the scaled scores, L = m + log(l), is written too: by attn into `ml` (bound to the
//   [B*H*Tq] L tensor when there are no splits) or by attn_combine into `lse_out`. The
//   backward recomputes the probabilities as exp(s - L) from it.

override WGQ: u32 = 8u;          // queries per workgroup
override CAUSAL: bool = false;
override SPLIT: bool = false;
override D_MULT4: bool = true;   // D % 4 == 0: no masking of the last vec4
override D4: u32 = 16u;          // ceil(D / 4): a constant loop bound, so loops over D unroll
override LSE: bool = false;      // also write the log-sum-exp per query

@compute @workgroup_size(WGQ)
fn attn(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    let bh = wid.y + p.bh0;
    let b = bh / p.heads;
    let h = bh % p.heads;
    let i = wid.x * WGQ + li;                 // this lane's query
    let live = i < p.tq;
    let qi = min(i, p.tq - 1u);
    let split = wid.z;
    let d4 = D4;

    var qv: array<vec4<f32>, DMAX4>;
    var acc: array<vec4<f32>, DMAX4>;
    start_query(b, h, qi, &qv, &acc);

    // Keys of this split (split_keys: a causal mask bounds them by the workgroup's last
    // query); each lane masks the keys past its own query.
    let keys = split_keys(split, wid.x * WGQ);
    let j0 = keys.x;
    let j1 = keys.y;
    let kb = b * p.k_sb + h * p.k_sh;
    var m = NEG_BIG;
    var l = 0.0;
    for (var j = j0; j < j1; j += 4u) {
        let js = vec4<u32>(j, j + 1u, j + 2u, j + 3u);
        var valid = js < vec4<u32>(j1);
        if CAUSAL {
            valid = valid & (js <= vec4<u32>(i));
        }
        let jc = min(js, vec4<u32>(j1 - 1u));  // past the end: re-read the last key, masked
        let b0 = kb + jc.x * p.k_st;
        let b1 = kb + jc.y * p.k_st;
        let b2 = kb + jc.z * p.k_st;
        let b3 = kb + jc.w * p.k_st;
        var s = vec4<f32>(0.0);
        for (var c = 0u; c < d4; c++) {
            let qc = qv[c];
            s += vec4<f32>(dot(qc, ld4k(b0, c)), dot(qc, ld4k(b1, c)),
                           dot(qc, ld4k(b2, c)), dot(qc, ld4k(b3, c)));
        }
        let sm = select(vec4<f32>(NEG_BIG), s, valid);
        let m_new = max(m, max(max(sm.x, sm.y), max(sm.z, sm.w)));
        let corr = exp(m - m_new);
        let pr = select(vec4<f32>(0.0), exp(s - m_new), valid);
        l = l * corr + ((pr.x + pr.y) + (pr.z + pr.w));
        m = m_new;
        for (var c = 0u; c < d4; c++) {
            var a = acc[c] * corr;
            a = fma(vec4<f32>(pr.x), ld4v(b0, c), a);
            a = fma(vec4<f32>(pr.y), ld4v(b1, c), a);
            a = fma(vec4<f32>(pr.z), ld4v(b2, c), a);
            a = fma(vec4<f32>(pr.w), ld4v(b3, c), a);
            acc[c] = a;
        }
    }
    if !live {
        return;
    }
    finish_query(bh, b, h, i, split, m, l, &acc);
}

override WGC: u32 = 64u;

// attn_combine with LSE: the log-sum-exp per query [B*H*Tq]. (Binding 4 is `k` in attn; a
// binding number may be reused by globals that no single entry point both uses.)
@group(0) @binding(4) var<storage, read_write> lse_out: array<f32>;

// Merges the split partials: one invocation per output value.
//   out = sum_s e^(m_s - M) acc_s / sum_s e^(m_s - M) l_s,  M = max_s m_s
@compute @workgroup_size(WGC)
fn attn_combine(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                @builtin(local_invocation_index) li: u32) {
    let e = grid_index(wid, nwg, WGC, li);
    let rows = p.bh * p.tq;
    if e >= rows * p.d {
        return;
    }
    let row = e / p.d;
    let d = e % p.d;
    var mx = NEG_BIG;
    for (var s = 0u; s < p.splits; s++) {
        mx = max(mx, ml[2u * (row * p.splits + s)]);
    }
    var num = 0.0;
    var den = 0.0;
    for (var s = 0u; s < p.splits; s++) {
        let slot = row * p.splits + s;
        let w = exp(ml[2u * slot] - mx);
        num = fma(w, f32(q[slot * p.d + d]), num);
        den = fma(w, ml[2u * slot + 1u], den);
    }
    let i = row % p.tq;
    let bh = row / p.tq;
    let b = bh / p.heads;
    let h = bh % p.heads;
    o[b * p.o_sb + h * p.o_sh + i * p.o_st + d] = elem(num / den);
    // L = M + log(sum_s e^(m_s - M) l_s): one lane per query writes it.
    if LSE && d == 0u {
        lse_out[row] = mx + log(den);
    }
}
