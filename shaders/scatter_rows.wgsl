// Backward of the row gather: grad_table[v, :] = sum of g[i, :] over the i with ids[i] == v.
// One invocation per table value; it walks the ids of one segment [start, start + len) in
// order, so the sum is deterministic (no atomics). Long id lists are split into segments of
// at most CPU_LOOP_LIMIT-safe length; later segments add to what earlier ones wrote.

struct Params {
    d: u32,          // row length
    vocab: u32,      // table rows
    start: u32,      // first id of this segment
    len: u32,        // ids in this segment
    accumulate: u32, // 1: add to grad_table, 0: overwrite it
    _pad0: u32, _pad1: u32, _pad2: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> out: array<f32>;  // [V, D]
@group(0) @binding(2) var<storage, read> ids: array<u32>;        // [N]
@group(0) @binding(3) var<storage, read> g: array<f32>;          // [N, D]

override WG: u32 = 256u;

@compute @workgroup_size(WG)
fn scatter_add_rows(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                    @builtin(local_invocation_index) li: u32) {
    let e = grid_index(wid, nwg, WG, li);
    if e >= p.vocab * p.d {
        return;
    }
    let v = e / p.d;
    let c = e % p.d;
    var acc = 0.0;
    for (var i = p.start; i < p.start + p.len; i = i + 1u) {
        if ids[i] == v {
            acc = acc + g[i * p.d + c];
        }
    }
    if p.accumulate != 0u {
        acc = acc + out[e];
    }
    out[e] = acc;
}
