// Row gather (embedding lookup) from one chunk of a row table:
//   y[n, :] = table[ids[n], :]   for the ids that fall in rows [row0, row0 + rows) of the table
// A table larger than one storage binding is split into row chunks; one dispatch per chunk
// writes the rows that chunk holds and leaves the others alone. Ids past the end of the
// table are clamped to its last row (callers with ids on the CPU check them first).
// One invocation per output value; values are copied as raw 32-bit words.

struct Params {
    n: u32,          // ids
    d: u32,          // row length
    vocab: u32,      // rows in the whole table
    row0: u32,       // first table row in this chunk
    rows: u32,       // rows in this chunk
    _pad0: u32, _pad1: u32, _pad2: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> y: array<u32>;   // [N, D]
@group(0) @binding(2) var<storage, read> ids: array<u32>;       // [N]
@group(0) @binding(3) var<storage, read> table: array<u32>;     // [rows, D]: this chunk

override WG: u32 = 256u;

@compute @workgroup_size(WG)
fn gather_rows(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
               @builtin(local_invocation_index) li: u32) {
    let e = grid_index(wid, nwg, WG, li);
    if e >= p.n * p.d {
        return;
    }
    let n = e / p.d;
    let id = min(ids[n], p.vocab - 1u);
    if id >= p.row0 && id < p.row0 + p.rows {
        y[e] = table[(id - p.row0) * p.d + e % p.d];
    }
}
