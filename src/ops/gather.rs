//! Embedding lookup: rows of a `[V, D]` table picked by u32 ids (`shaders/gather.wgsl`).
//!
//! A table may be larger than one storage binding allows (CLIP ViT-L's token embedding,
//! 49408 × 768 f32, is 151 MB against lavapipe's 128 MiB): [`RowTable`] keeps it as row
//! chunks that each fit, and the lookup runs one dispatch per chunk.
//!
//! Loading a table from a checkpoint: `RowTable::from_slice(gpu, &loader.cpu("weight",
//! &[v, d])?, v, d)`.

use crate::gpu::{grid_1d, Kernel, Shader};
use crate::tensor::{DType, Tensor};
use crate::{Error, Gpu, Result};

/// The `override` constants the kernels below set.
mod ov {
    use crate::gpu::Override;
    pub(super) const WG: Override<u32> = Override::new("WG");
}

pub(crate) static SHADER: Shader<Params> = crate::shader!("gather", "grid", overrides = [ov::WG]);
const WG: u32 = 256;

crate::shader_params! {
    /// Mirrors `struct Params` in `shaders/gather.wgsl`.
    pub(crate) struct Params {
        n: u32,
        d: u32,
        vocab: u32,
        row0: u32,
        rows: u32,
        _pad: [u32; 3],
    }
}

/// A `[V, D]` table stored as consecutive row chunks, each within the device's binding
/// limit.
#[derive(Debug, Clone)]
pub struct RowTable {
    chunks: Vec<Tensor>,
    rows_per_chunk: usize,
    rows: usize,
    dim: usize,
}

impl RowTable {
    /// Uploads `data` (`rows × dim`, row-major) in chunks that fit the device's
    /// `max_storage_buffer_binding_size` and `max_buffer_size`.
    pub fn from_slice(gpu: &Gpu, data: &[f32], rows: usize, dim: usize) -> Result<RowTable> {
        let l = gpu.limits();
        let limit = l.max_storage_buffer_binding_size.min(l.max_buffer_size);
        RowTable::from_slice_with_limit(gpu, data, rows, dim, limit)
    }

    /// [`RowTable::from_slice`] with chunks of at most `max_chunk_bytes` (tests use small
    /// limits to exercise chunking).
    pub fn from_slice_with_limit(
        gpu: &Gpu,
        data: &[f32],
        rows: usize,
        dim: usize,
        max_chunk_bytes: u64,
    ) -> Result<RowTable> {
        if data.len() != rows * dim {
            return Err(Error::shape(format!(
                "row table of {rows} × {dim} needs {} values, got {}",
                rows * dim,
                data.len()
            )));
        }
        if rows == 0 || dim == 0 {
            return Err(Error::shape(format!(
                "row table of {rows} × {dim} is empty"
            )));
        }
        let row_bytes = dim as u64 * 4;
        let rows_per_chunk = (max_chunk_bytes / row_bytes) as usize;
        if rows_per_chunk == 0 {
            return Err(Error::TooLarge {
                what: format!("one row of a table of width {dim}"),
                needed: row_bytes,
                limit: max_chunk_bytes,
                hint: "max_storage_buffer_binding_size",
            });
        }
        let chunks = data
            .chunks(rows_per_chunk * dim)
            .map(|c| Tensor::from_slice(gpu, c, &[c.len() / dim, dim]))
            .collect::<Result<Vec<_>>>()?;
        Ok(RowTable {
            chunks,
            rows_per_chunk,
            rows,
            dim,
        })
    }

    /// A table already on the GPU, as one chunk. `t`: `[V, D]`.
    pub fn from_tensor(t: &Tensor) -> Result<RowTable> {
        t.expect_f32("row table")?;
        if t.rank() != 2 || t.numel() == 0 {
            return Err(Error::shape(format!(
                "a row table must be a non-empty [V, D] tensor, got {:?}",
                t.shape()
            )));
        }
        Ok(RowTable {
            chunks: vec![t.clone()],
            rows_per_chunk: t.dim(0),
            rows: t.dim(0),
            dim: t.dim(1),
        })
    }

    /// Number of rows V.
    pub fn rows(&self) -> usize {
        self.rows
    }
    /// Row length D.
    pub fn dim(&self) -> usize {
        self.dim
    }
    /// The chunks, in row order (each `[rows_i, D]`).
    pub fn chunks(&self) -> &[Tensor] {
        &self.chunks
    }
}

/// Errors if any id is `>= rows`, naming the first bad one.
pub fn check_ids(ids: &[u32], rows: usize) -> Result<()> {
    match ids.iter().position(|&i| i as usize >= rows) {
        None => Ok(()),
        Some(p) => Err(Error::invalid(format!(
            "id {} at position {p} is out of range for a table of {rows} rows",
            ids[p]
        ))),
    }
}

/// `table[ids]`: `table` `[V, D]`, `ids` a u32 tensor of any shape; returns
/// `ids.shape() + [D]`. Ids `>= V` are clamped to `V - 1` on the GPU; use
/// [`gather_rows_from_ids`] to have ids from the CPU checked instead.
pub fn gather_rows(table: &Tensor, ids: &Tensor) -> Result<Tensor> {
    gather_rows_table(&RowTable::from_tensor(table)?, ids)
}

/// [`gather_rows`] from a chunked [`RowTable`].
pub fn gather_rows_table(table: &RowTable, ids: &Tensor) -> Result<Tensor> {
    if ids.dtype() != DType::U32 {
        return Err(Error::invalid("gather_rows ids must be a u32 tensor"));
    }
    let (n, d) = (ids.numel(), table.dim);
    let mut shape = ids.shape().to_vec();
    shape.push(d);
    let gpu = ids.gpu();
    let y = Tensor::empty(gpu, &shape, DType::F32)?;
    if n == 0 {
        return Ok(y);
    }
    if n * d > u32::MAX as usize - WG as usize || table.rows > u32::MAX as usize {
        return Err(Error::shape(format!(
            "gather of {n} rows of {d} values is too large"
        )));
    }
    let k = Kernel::new(&SHADER, "gather_rows").with(ov::WG, WG);
    for (ci, chunk) in table.chunks.iter().enumerate() {
        let p = Params {
            n: n as u32,
            d: d as u32,
            vocab: table.rows as u32,
            row0: (ci * table.rows_per_chunk) as u32,
            rows: chunk.dim(0) as u32,
            _pad: [0; 3],
        };
        gpu.dispatch(
            &k,
            &p,
            &[y.binding(), ids.binding(), chunk.binding()],
            grid_1d(((n * d) as u32).div_ceil(WG)),
        );
    }
    Ok(y)
}

/// Checks ids from the CPU against the table ([`check_ids`]), uploads them as `shape`, and
/// gathers: returns `shape + [D]`.
pub fn gather_rows_from_ids(
    gpu: &Gpu,
    table: &RowTable,
    ids: &[u32],
    shape: &[usize],
) -> Result<Tensor> {
    check_ids(ids, table.rows)?;
    gather_rows_table(table, &Tensor::from_u32(gpu, ids, shape)?)
}

pub(crate) static SCATTER: Shader<ScatterParams> =
    crate::shader!("scatter_rows", "grid", overrides = [ov::WG]);

crate::shader_params! {
    pub(crate) struct ScatterParams {
        d: u32,
        vocab: u32,
        start: u32,
        len: u32,
        accumulate: u32,
        _pad: [u32; 3],
    }
}

/// Ids walked per dispatch of [`scatter_add_rows`] (under llvmpipe's loop cap).
const SCATTER_SEGMENT: usize = 16_384;

/// The backward of [`gather_rows`]: `out[v, :] = Σ g[i, :]` over the `i` with `ids[i] == v`,
/// `out` `[vocab, D]`; `g` `[N, D]` (any leading shape with `N` rows), `ids` u32 with `N`
/// values. Rows no id names are zero; ids `>= vocab` contribute nothing. Deterministic (each
/// output walks the ids in order; no atomics).
pub fn scatter_add_rows(g: &Tensor, ids: &Tensor, vocab: usize) -> Result<Tensor> {
    if ids.dtype() != DType::U32 {
        return Err(Error::invalid("scatter_add_rows ids must be a u32 tensor"));
    }
    g.expect_f32("scatter_add_rows gradient")?;
    let n = ids.numel();
    let d = if g.rank() == 0 { 0 } else { g.dim(-1) };
    if g.numel() != n * d || d == 0 || vocab == 0 {
        return Err(Error::shape(format!(
            "scatter_add_rows: gradient {:?} does not hold {n} rows for a [{vocab}, D] table",
            g.shape()
        )));
    }
    if vocab * d > u32::MAX as usize - WG as usize {
        return Err(Error::shape(format!(
            "scatter of a [{vocab}, {d}] table is too large"
        )));
    }
    let gpu = g.gpu();
    let out = Tensor::empty(gpu, &[vocab, d], DType::F32)?;
    let k = Kernel::new(&SCATTER, "scatter_add_rows").with(ov::WG, WG);
    let segments = n.div_ceil(SCATTER_SEGMENT).max(1);
    for s in 0..segments {
        let start = s * SCATTER_SEGMENT;
        let p = ScatterParams {
            d: d as u32,
            vocab: vocab as u32,
            start: start as u32,
            len: SCATTER_SEGMENT.min(n - start.min(n)) as u32,
            accumulate: (s > 0) as u32,
            _pad: [0; 3],
        };
        gpu.dispatch(
            &k,
            &p,
            &[out.binding(), ids.binding(), g.binding()],
            grid_1d(((vocab * d) as u32).div_ceil(WG)),
        );
    }
    Ok(out)
}

/// CPU reference of [`scatter_add_rows`].
pub fn reference_scatter(g: &[f32], dim: usize, ids: &[u32], vocab: usize) -> Vec<f32> {
    let mut out = vec![0.0f64; vocab * dim];
    for (i, &id) in ids.iter().enumerate() {
        if (id as usize) < vocab {
            for c in 0..dim {
                out[id as usize * dim + c] += g[i * dim + c] as f64;
            }
        }
    }
    out.into_iter().map(|v| v as f32).collect()
}

/// CPU reference: rows of `table` (`[V, dim]`) at `ids` (clamped like the kernel).
pub fn reference(table: &[f32], dim: usize, ids: &[u32]) -> Vec<f32> {
    let v = table.len() / dim;
    ids.iter()
        .flat_map(|&i| {
            let r = (i as usize).min(v - 1);
            table[r * dim..(r + 1) * dim].iter().copied()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testutil::{gpu, rand_vec};

    fn ids_for(n: usize, v: usize, seed: u64) -> Vec<u32> {
        rand_vec(n, seed)
            .iter()
            .map(|x| ((x + 1.0) * 0.5 * v as f32) as u32 % v as u32)
            .collect()
    }

    #[test]
    fn scatter_add_matches_reference_over_shapes() {
        let g = gpu();
        // (vocab, dim, ids): repeated ids, unused rows, more ids than one segment.
        for (v, d, n) in [
            (1, 1, 1),
            (3, 5, 7),
            (17, 65, 40),
            (256, 3, 40_000),
            (5, 2, 16_385),
        ] {
            let gv = rand_vec(n * d, (n + d) as u64);
            let gt = Tensor::from_slice(&g, &gv, &[n, d]).unwrap();
            let idv = ids_for(n, v, v as u64);
            let ids = Tensor::from_u32(&g, &idv, &[n]).unwrap();
            let got = scatter_add_rows(&gt, &ids, v).unwrap();
            assert_eq!(got.shape(), &[v, d]);
            let want = reference_scatter(&gv, d, &idv, v);
            // f32 sums of up to n/v terms of size <= 1 in a different order than f64.
            let tol = 1e-6 * (n as f32 / v as f32).max(1.0) * 4.0;
            for (i, (a, b)) in got.to_vec().unwrap().iter().zip(&want).enumerate() {
                assert!((a - b).abs() <= tol, "V{v} D{d} N{n} [{i}]: {a} vs {b}");
            }
        }
        // Rows nobody names are zero; runs are bit-identical.
        let gt = Tensor::from_slice(&g, &[1.0, 2.0, 3.0, 4.0], &[2, 2]).unwrap();
        let ids = Tensor::from_u32(&g, &[2, 2], &[2]).unwrap();
        let a = scatter_add_rows(&gt, &ids, 4).unwrap().to_vec().unwrap();
        assert_eq!(a, vec![0.0, 0.0, 0.0, 0.0, 4.0, 6.0, 0.0, 0.0]);
        let b = scatter_add_rows(&gt, &ids, 4).unwrap().to_vec().unwrap();
        assert_eq!(a, b);
        assert!(scatter_add_rows(&gt, &ids, 0).is_err());
    }

    #[test]
    fn matches_reference_over_shapes() {
        let g = gpu();
        for (v, d, n) in [
            (1, 1, 1),
            (3, 5, 7),
            (17, 65, 3),
            (1000, 3, 1031),
            (49, 512, 77),
        ] {
            let tv = rand_vec(v * d, (v + d) as u64);
            let t = Tensor::from_slice(&g, &tv, &[v, d]).unwrap();
            let idv = ids_for(n, v, n as u64);
            let ids = Tensor::from_u32(&g, &idv, &[n]).unwrap();
            let y = gather_rows(&t, &ids).unwrap();
            assert_eq!(y.shape(), &[n, d]);
            // A copy: bit-exact.
            assert_eq!(
                y.to_vec().unwrap(),
                reference(&tv, d, &idv),
                "V{v} D{d} N{n}"
            );
        }
        // Ids of any shape.
        let tv = rand_vec(10 * 4, 1);
        let t = Tensor::from_slice(&g, &tv, &[10, 4]).unwrap();
        let idv: Vec<u32> = (0..6).map(|i| (i * 3) % 10).collect();
        let ids = Tensor::from_u32(&g, &idv, &[2, 3]).unwrap();
        let y = gather_rows(&t, &ids).unwrap();
        assert_eq!(y.shape(), &[2, 3, 4]);
        assert_eq!(y.to_vec().unwrap(), reference(&tv, 4, &idv));
    }

    #[test]
    fn chunked_tables_match_one_chunk() {
        let g = gpu();
        let (v, d) = (1001usize, 7usize);
        let tv = rand_vec(v * d, 3);
        let idv: Vec<u32> = ids_for(500, v, 4)
            .into_iter()
            .chain([0, 1000, 999, 64, 63])
            .collect();
        let want = reference(&tv, d, &idv);
        // Chunks of 64 rows (and a last one of 41), of 1 row, and of 3.5 rows (3).
        for limit in [64 * 7 * 4, 7 * 4, 98] {
            let table = RowTable::from_slice_with_limit(&g, &tv, v, d, limit).unwrap();
            let expect_chunks = v.div_ceil((limit / 28) as usize);
            assert_eq!(table.chunks().len(), expect_chunks);
            let y = gather_rows_from_ids(&g, &table, &idv, &[idv.len()]).unwrap();
            assert_eq!(y.to_vec().unwrap(), want, "limit {limit}");
        }
        let e = RowTable::from_slice_with_limit(&g, &tv, v, d, 27)
            .unwrap_err()
            .to_string();
        assert!(e.contains("one row"), "{e}");
    }

    #[test]
    fn table_larger_than_one_binding() {
        // CLIP ViT-L's token embedding: 49408 × 768 f32 = 151.8 MB, over lavapipe's 128 MiB.
        let g = gpu();
        let (v, d) = (49_408usize, 768usize);
        let tv: Vec<f32> = (0..v * d).map(|i| (i % 100_003) as f32).collect();
        let table = RowTable::from_slice(&g, &tv, v, d).unwrap();
        let limit = g.limits().max_storage_buffer_binding_size;
        assert_eq!(
            table.chunks().len(),
            ((v * d * 4) as u64).div_ceil(limit / (d as u64 * 4) * d as u64 * 4) as usize
        );
        let idv = [49_407u32, 0, 43_690, 43_691, 20_000, 49_406];
        let y = gather_rows_from_ids(&g, &table, &idv, &[6]).unwrap();
        assert_eq!(y.to_vec().unwrap(), reference(&tv, d, &idv));
    }

    #[test]
    fn out_of_range_ids() {
        let g = gpu();
        let tv = rand_vec(5 * 3, 5);
        let table = RowTable::from_slice(&g, &tv, 5, 3).unwrap();
        let e = gather_rows_from_ids(&g, &table, &[0, 4, 5, 1], &[4])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("id 5 at position 2") && e.contains("5 rows"),
            "{e}"
        );
        // On the GPU side the kernel clamps instead of reading out of bounds.
        let ids = Tensor::from_u32(&g, &[7, 0], &[2]).unwrap();
        let y = gather_rows_table(&table, &ids).unwrap().to_vec().unwrap();
        assert_eq!(y, reference(&tv, 3, &[4, 0]));
        let f = Tensor::zeros(&g, &[2]).unwrap();
        let e = gather_rows_table(&table, &f).unwrap_err().to_string();
        assert!(e.contains("u32"), "{e}");
    }

    #[test]
    fn more_than_65535_workgroups() {
        // 66,000 × 260 = 17.2M values: 67,032 workgroups of 256.
        let g = gpu();
        let (v, d, n) = (300usize, 260usize, 66_000usize);
        let tv = rand_vec(v * d, 6);
        let t = Tensor::from_slice(&g, &tv, &[v, d]).unwrap();
        let idv = ids_for(n, v, 7);
        let ids = Tensor::from_u32(&g, &idv, &[n]).unwrap();
        let y = gather_rows(&t, &ids).unwrap().to_vec().unwrap();
        assert_eq!(y, reference(&tv, d, &idv));
    }
}
