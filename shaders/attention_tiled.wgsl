// Fused multi-head attention forward for GPUs: the same maths, addressing (strides and
// q/k/v offsets, so [B, H, T, D], [B, T, H*D] and the packed [B, T, 3*H*D] qkv all work),
// key splits and outputs (split partials with (m, l), or the output and the log-sum-exp
// with LSE) as `attn` in attention.wgsl, whose header explains them; the splits are merged
// by that file's attn_combine.
//
// attn_tiled: a workgroup handles WGQ consecutive queries of one (batch, head), one
//   invocation per query (its pre-scaled query row and output accumulator in private
//   arrays, as in attn). Where attn has every lane read the same key and value rows from
//   global memory, here the workgroup walks the keys in tiles of KT rows: the invocations
//   load the K and V tiles together into workgroup memory (consecutive lanes read
//   consecutive values of a row: coalesced, vec4 when D_MULT4), barrier, then each scores
//   its query against the tile and folds the tile's value rows into its accumulator with
//   an online softmax (running max m, sum l, accumulator rescaled when m grows), 4 keys at
//   a time, all reading the same workgroup address (a broadcast), barrier, next tile. Each
//   key and value row thus leaves global memory once per workgroup instead of once per
//   lane. On CPU Vulkan the uniform loads of attn are already one load plus a broadcast,
//   and barriers are expensive, so attn stays the default there (ops::attention::Forward).
//
// The tiles are two arrays of TILE4 vec4s: 16 KiB, the WebGPU minimum of workgroup storage;
// KT * D4 <= TILE4 and KT % 4 == 0 (set by the host from D). Barriers stay in uniform
// control flow: the tile loop's bounds depend on the workgroup and the params only, and
// lanes past Tq run the loop like the others and just do not store.

// Params, bindings, DMAX4, NEG_BIG and the row loads ld4q / ld4k / ld4v: shaders/lib/attention_io.wgsl.

override WGQ: u32 = 64u;         // queries (invocations) per workgroup
override CAUSAL: bool = false;
override SPLIT: bool = false;
override D_MULT4: bool = true;   // D % 4 == 0 and rows 16-byte aligned: vec4 loads
override D4: u32 = 16u;          // ceil(D / 4): a constant loop bound, so loops over D unroll
override LSE: bool = false;      // also write the log-sum-exp per query
override KT: u32 = 32u;          // keys per tile: KT * D4 <= TILE4, KT % 4 == 0

const TILE4: u32 = 512u;

var<workgroup> tile_k: array<vec4<f32>, TILE4>;   // KT key rows of D4 vec4s
var<workgroup> tile_v: array<vec4<f32>, TILE4>;   // the same KT value rows

@compute @workgroup_size(WGQ)
fn attn_tiled(@builtin(workgroup_id) wid: vec3<u32>,
              @builtin(local_invocation_index) li: u32) {
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
    for (var t0 = j0; t0 < j1; t0 += KT) {
        // Rows staged: the keys left, up to KT, rounded up to whole groups of 4 (rows past
        // j1 re-read key j1 - 1: finite, and masked below).
        let rows = min(KT, (j1 - t0 + 3u) & ~3u);
        let n = rows * d4;
        for (var e0 = 0u; e0 < n; e0 += WGQ) {
            let e = e0 + li;
            if e < n {
                let base = kb + min(t0 + e / d4, j1 - 1u) * p.k_st;
                tile_k[e] = ld4k(base, e % d4);
                tile_v[e] = ld4v(base, e % d4);
            }
        }
        workgroupBarrier();
        for (var r = 0u; r < rows; r += 4u) {
            let js = vec4<u32>(t0 + r) + vec4<u32>(0u, 1u, 2u, 3u);
            var valid = js < vec4<u32>(j1);
            if CAUSAL {
                valid = valid & (js <= vec4<u32>(i));
            }
            let r0 = r * d4;
            let r1 = r0 + d4;
            let r2 = r1 + d4;
            let r3 = r2 + d4;
            var s = vec4<f32>(0.0);
            for (var c = 0u; c < d4; c++) {
                let qc = qv[c];
                s += vec4<f32>(dot(qc, tile_k[r0 + c]), dot(qc, tile_k[r1 + c]),
                               dot(qc, tile_k[r2 + c]), dot(qc, tile_k[r3 + c]));
            }
            let sm = select(vec4<f32>(NEG_BIG), s, valid);
            let m_new = max(m, max(max(sm.x, sm.y), max(sm.z, sm.w)));
            let corr = exp(m - m_new);
            let pr = select(vec4<f32>(0.0), exp(s - m_new), valid);
            l = l * corr + ((pr.x + pr.y) + (pr.z + pr.w));
            m = m_new;
            for (var c = 0u; c < d4; c++) {
                var a = acc[c] * corr;
                a = fma(vec4<f32>(pr.x), tile_v[r0 + c], a);
                a = fma(vec4<f32>(pr.y), tile_v[r1 + c], a);
                a = fma(vec4<f32>(pr.z), tile_v[r2 + c], a);
                a = fma(vec4<f32>(pr.w), tile_v[r3 + c], a);
                acc[c] = a;
            }
        }
        // The next tile overwrites these rows.
        workgroupBarrier();
    }
    if !live {
        return;
    }
    finish_query(bh, b, h, i, split, m, l, &acc);
}
