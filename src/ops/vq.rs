//! Vector quantisation (`shaders/vq.wgsl`): per position of an NCHW tensor, the nearest
//! codebook entry by `||z||² + ||e||² − 2 z·e` (ties to the lowest index), the gather of the
//! chosen entries back into NCHW, and the channel argmax used by Gumbel quantisers.
//!
//! The search is a distance matmul when its scores fit [`SCORES_BUDGET`]: the tuned matmul
//! computes `||e||² − 2 z·e` for every (position, code) pair (the distance less `||z||²`,
//! which is the same for a position's codes), then an argmin pass picks each row's code. A
//! direct kernel (one invocation per position and chunk of codes, dot products in a loop)
//! takes the rest; on lavapipe it ran at 0.3 GFLOP/s against the matmul's 10 or more.
//!
//! Deterministic: each position's search is split into chunks of codes whose minima are then
//! reduced in index order; no atomics.

use super::CPU_LOOP_LIMIT;
use crate::gpu::{grid_1d, Kernel, Shader};
use crate::tensor::{DType, Tensor};
use crate::{Error, Result};

/// The `override` constants the kernels below set.
mod ov {
    use crate::gpu::Override;
    pub(super) const CHUNK: Override<u32> = Override::new("CHUNK");
}

pub(crate) static SHADER: Shader<Params> = crate::shader!("vq", "grid", overrides = [ov::CHUNK]);
const WG: u32 = 64;
/// Most codes searched by one invocation of `nearest_partial`.
const MAX_CHUNK: usize = 256;
/// Codes per invocation of `scores_partial` (one load and compare each).
const SCORES_CHUNK: usize = 256;
/// Most bytes of distance-matmul scores held at once (images are searched in groups
/// under it; an image whose scores alone exceed it takes the direct kernel).
pub const SCORES_BUDGET: u64 = 64 << 20;

/// Codes per invocation so that its loops (`d` steps for `||z||²`, `d + 1` per code) stay
/// under llvmpipe's per-invocation iteration cap.
fn chunk_for(d: usize) -> Result<usize> {
    let budget = CPU_LOOP_LIMIT * 3 / 4;
    if 2 * d + 1 > budget {
        return Err(Error::shape(format!(
            "vq vectors of {d} channels are too long for one invocation"
        )));
    }
    Ok(((budget - d) / (d + 1)).clamp(1, MAX_CHUNK))
}

crate::shader_params! {
    /// Mirrors `struct Params` in `shaders/vq.wgsl`.
    pub(crate) struct Params {
        m: u32,
        hw: u32,
        d: u32,
        k: u32,
        chunks: u32,
        total: u32,
        _pad: [u32; 2],
    }
}

fn nchw(t: &Tensor, what: &str) -> Result<(usize, usize, usize, usize)> {
    t.expect_f32(what)?;
    if t.rank() != 4 {
        return Err(Error::shape(format!(
            "{what} must be [N, C, H, W], got {:?}",
            t.shape()
        )));
    }
    if t.numel() > u32::MAX as usize {
        return Err(Error::shape(format!("{what} has more than 2^32 elements")));
    }
    Ok((t.dim(0), t.dim(1), t.dim(2), t.dim(3)))
}

fn codebook_dims(e: &Tensor, d: usize) -> Result<usize> {
    e.expect_f32("codebook")?;
    if e.rank() != 2 || e.dim(1) != d || e.dim(0) == 0 {
        return Err(Error::shape(format!(
            "codebook {:?} does not match vectors of {d} channels (expected [K > 0, {d}])",
            e.shape()
        )));
    }
    Ok(e.dim(0))
}

/// Nearest codebook entry per position.
///
/// `z`: `[N, D, H, W]`; `codebook`: `[K, D]`. Returns the codes `[N, H, W]` (u32).
pub fn nearest_codes(z: &Tensor, codebook: &Tensor) -> Result<Tensor> {
    let (n, d, h, w) = nchw(z, "vq input")?;
    let k = codebook_dims(codebook, d)?;
    let gpu = z.gpu();
    let m = n * h * w;
    let codes = Tensor::empty(gpu, &[n, h, w], DType::U32)?;
    if m == 0 {
        return Ok(codes);
    }
    if d == 0 {
        return Err(Error::shape("vq input has zero channels"));
    }
    let per_image = (h * w * k * 4) as u64;
    let budget = SCORES_BUDGET.min(gpu.limits().max_storage_buffer_binding_size);
    if per_image <= budget {
        let group = ((budget / per_image) as usize).clamp(1, n);
        return nearest_by_scores(z, codebook, group);
    }
    nearest_direct(z, codebook, codes)
}

/// ||e||² per code `[K]`, made once per codebook.
fn code_norms(codebook: &Tensor) -> Result<Tensor> {
    let gpu = codebook.gpu();
    gpu.derived("vq_code_norms", &[codebook], || {
        let (k, d) = (codebook.dim(0), codebook.dim(1));
        let p = Params {
            m: 0,
            hw: 0,
            d: d as u32,
            k: k as u32,
            chunks: 0,
            total: 0,
            _pad: [0; 2],
        };
        let ee = Tensor::empty(gpu, &[k], DType::F32)?;
        gpu.dispatch(
            &Kernel::new(&SHADER, "code_norms"),
            &p,
            &[codebook.binding(), ee.binding()],
            grid_1d((k as u32).div_ceil(WG)),
        );
        Ok(ee)
    })
}

/// [`nearest_codes`] as a distance matmul, `group` images at a time: per position the lowest
/// of `−2 zᵀE + ||e||²` (z read in its NCHW layout as a transposed operand; the distance less
/// `||z||²`), lowest index on ties. Where the product's kernel has the fused row-argmin
/// epilogue ([`matmul_row_argmin`](super::matmul::matmul_row_argmin)), the scores are never
/// written: the matmul leaves per-block minima and [`reduce`] picks each position's code;
/// elsewhere the scores `[m, HW, K]` are written and `scores_partial` takes per-chunk minima
/// first.
fn nearest_by_scores(z: &Tensor, codebook: &Tensor, group: usize) -> Result<Tensor> {
    use super::matmul::{matmul, matmul_row_argmin, MatmulOpts};
    let (n, d, h, w) = (z.dim(0), z.dim(1), z.dim(2), z.dim(3));
    let (hw, k) = (h * w, codebook.dim(0));
    let gpu = z.gpu();
    let ee = code_norms(codebook)?;
    let mut parts = Vec::with_capacity(n.div_ceil(group));
    for n0 in (0..n).step_by(group) {
        let g = group.min(n - n0);
        let zs = if g == n {
            z.clone()
        } else {
            super::concat::slice(z, 0, n0, g)?
        };
        let zs = zs.reshape(&[g, d, hw])?;
        let o = MatmulOpts {
            trans_a: true,
            trans_b: true,
            alpha: Some(-2.0),
            bias: Some(&ee),
            ..Default::default()
        };
        let m = g * hw;
        let codes = Tensor::empty(gpu, &[g, h, w], DType::U32)?;
        if let Some(pairs) = matmul_row_argmin(&zs, codebook, &o)? {
            reduce(&pairs, m, pairs.dim(-2), &codes)?;
            parts.push(codes);
            continue;
        }
        let scores = matmul(&zs, codebook, &o)?;
        let chunks = k.div_ceil(SCORES_CHUNK);
        let p = params(m, hw, d, k, chunks)?;
        let pairs = Tensor::empty(gpu, &[m, chunks, 2], DType::F32)?;
        gpu.dispatch(
            &Kernel::new(&SHADER, "scores_partial").with(ov::CHUNK, SCORES_CHUNK as u32),
            &p,
            &[scores.binding(), pairs.binding()],
            grid_1d(((m * chunks) as u32).div_ceil(WG)),
        );
        reduce(&pairs, m, chunks, &codes)?;
        parts.push(codes);
    }
    if parts.len() == 1 {
        return Ok(parts.remove(0));
    }
    let refs: Vec<&Tensor> = parts.iter().collect();
    super::concat::concat(&refs, 0)
}

/// The search's params for `m` positions of `hw` per image, vectors of `d`, `k` codes in
/// `chunks` chunks (whose `[m, chunks, 2]` pairs must be indexable in u32).
fn params(m: usize, hw: usize, d: usize, k: usize, chunks: usize) -> Result<Params> {
    if m.checked_mul(2 * chunks)
        .is_none_or(|t| t > u32::MAX as usize)
    {
        return Err(Error::shape("vq: positions x codebook chunks exceed 2^31"));
    }
    Ok(Params {
        m: m as u32,
        hw: hw as u32,
        d: d as u32,
        k: k as u32,
        chunks: chunks as u32,
        total: 0,
        _pad: [0; 2],
    })
}

/// Each of `m` positions' code from its `chunks` (distance, code) pairs `pairs`
/// (`[m, chunks, 2]`): the lowest distance, the lowest code on ties (`nearest_reduce`).
fn reduce(pairs: &Tensor, m: usize, chunks: usize, codes: &Tensor) -> Result<()> {
    let p = params(m, 0, 0, 0, chunks)?;
    pairs.gpu().dispatch(
        &Kernel::new(&SHADER, "nearest_reduce"),
        &p,
        &[pairs.binding(), codes.binding()],
        grid_1d((m as u32).div_ceil(WG)),
    );
    Ok(())
}

/// [`nearest_codes`] with the direct kernel: one invocation per position and chunk of codes.
fn nearest_direct(z: &Tensor, codebook: &Tensor, codes: Tensor) -> Result<Tensor> {
    let (n, d, h, w) = (z.dim(0), z.dim(1), z.dim(2), z.dim(3));
    let k = codebook.dim(0);
    let m = n * h * w;
    let gpu = z.gpu();
    let chunk = chunk_for(d)?;
    let chunks = k.div_ceil(chunk);
    let p = params(m, h * w, d, k, chunks)?;
    let ee = code_norms(codebook)?;
    let pairs = Tensor::empty(gpu, &[m, chunks, 2], DType::F32)?;
    gpu.dispatch(
        &Kernel::new(&SHADER, "nearest_partial").with(ov::CHUNK, chunk as u32),
        &p,
        &[
            z.binding(),
            codebook.binding(),
            ee.binding(),
            pairs.binding(),
        ],
        {
            let g = grid_1d((m as u32).div_ceil(WG));
            [g[0], chunks as u32, g[1]]
        },
    );
    reduce(&pairs, m, chunks, &codes)?;
    Ok(codes)
}

/// Codebook rows for a grid of codes: `codes` `[N, H, W]` (u32), `codebook` `[K, D]` ->
/// `[N, D, H, W]`. Codes must be below K (codes from [`nearest_codes`] are; check codes read
/// from a user's file with [`check_codes`] first).
pub fn gather(codes: &Tensor, codebook: &Tensor) -> Result<Tensor> {
    if codes.dtype() != DType::U32 || codes.rank() != 3 {
        return Err(Error::shape(format!(
            "vq gather needs u32 codes [N, H, W], got {:?} {:?}",
            codes.dtype(),
            codes.shape()
        )));
    }
    codebook.expect_f32("codebook")?;
    if codebook.rank() != 2 || codebook.dim(0) == 0 {
        return Err(Error::shape(format!(
            "codebook must be [K > 0, D], got {:?}",
            codebook.shape()
        )));
    }
    let (n, h, w) = (codes.dim(0), codes.dim(1), codes.dim(2));
    let (k, d) = (codebook.dim(0), codebook.dim(1));
    let gpu = codes.gpu();
    let out = Tensor::empty(gpu, &[n, d, h, w], DType::F32)?;
    let total = out.numel();
    if total == 0 {
        return Ok(out);
    }
    if total > u32::MAX as usize {
        return Err(Error::shape("vq gather output has more than 2^32 elements"));
    }
    let p = Params {
        m: (n * h * w) as u32,
        hw: (h * w) as u32,
        d: d as u32,
        k: k as u32,
        chunks: 0,
        total: total as u32,
        _pad: [0; 2],
    };
    gpu.dispatch(
        &Kernel::new(&SHADER, "gather"),
        &p,
        &[codes.binding(), codebook.binding(), out.binding()],
        grid_1d((total as u32).div_ceil(WG)),
    );
    Ok(out)
}

/// Checks CPU-side codes against a codebook size, naming the first bad one.
pub fn check_codes(codes: &[u32], k: usize) -> Result<()> {
    match codes.iter().position(|&c| c as usize >= k) {
        Some(i) => Err(Error::invalid(format!(
            "code {} at position {i} is outside the codebook of {k} entries",
            codes[i]
        ))),
        None => Ok(()),
    }
}

/// Nearest entries and their vectors: `(codes [N, H, W] u32, z_q [N, D, H, W])`.
pub fn nearest(z: &Tensor, codebook: &Tensor) -> Result<(Tensor, Tensor)> {
    let codes = nearest_codes(z, codebook)?;
    let zq = gather(&codes, codebook)?;
    Ok((codes, zq))
}

/// Per position, the channel with the largest value (lowest index on ties): `x`
/// `[N, C, H, W]` -> u32 `[N, H, W]`.
pub fn argmax_channels(x: &Tensor) -> Result<Tensor> {
    let (n, c, h, w) = nchw(x, "argmax input")?;
    let gpu = x.gpu();
    let out = Tensor::empty(gpu, &[n, h, w], DType::U32)?;
    let m = n * h * w;
    if m == 0 {
        return Ok(out);
    }
    if c == 0 {
        return Err(Error::shape("argmax over zero channels"));
    }
    let p = Params {
        m: m as u32,
        hw: (h * w) as u32,
        d: c as u32,
        k: c as u32,
        chunks: 0,
        total: 0,
        _pad: [0; 2],
    };
    gpu.dispatch(
        &Kernel::new(&SHADER, "argmax_channels"),
        &p,
        &[x.binding(), out.binding()],
        grid_1d((m as u32).div_ceil(WG)),
    );
    Ok(out)
}

/// CPU reference: per position of `z` (`[N, D, H, W]` flat), the exact (f64) squared
/// distance to every code of `e` (`[K, D]` flat). Returns `dist[m][k]`.
pub fn reference_distances(z: &[f32], n: usize, d: usize, hw: usize, e: &[f32]) -> Vec<Vec<f64>> {
    let k = e.len() / d.max(1);
    let mut out = Vec::with_capacity(n * hw);
    for b in 0..n {
        for s in 0..hw {
            out.push(
                (0..k)
                    .map(|c| {
                        (0..d)
                            .map(|j| {
                                let diff = z[(b * d + j) * hw + s] as f64 - e[c * d + j] as f64;
                                diff * diff
                            })
                            .sum()
                    })
                    .collect(),
            );
        }
    }
    out
}

/// CPU reference of the code choice: the lowest index with the smallest distance.
pub fn reference_argmin(dist: &[f64]) -> u32 {
    let mut best = 0;
    for (i, &v) in dist.iter().enumerate() {
        if v < dist[best] {
            best = i;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testutil::{gpu, rand_vec};

    /// Checks codes against exact distances: the chosen code's distance is within `tol` of
    /// the minimum (f32 rounding can only flip near-ties), exact where the gap is larger.
    fn check_nearest(n: usize, d: usize, h: usize, w: usize, k: usize, seed: u64) {
        let g = gpu();
        let zv = rand_vec(n * d * h * w, seed);
        let ev = rand_vec(k * d, seed + 1);
        let z = Tensor::from_slice(&g, &zv, &[n, d, h, w]).unwrap();
        let e = Tensor::from_slice(&g, &ev, &[k, d]).unwrap();
        let (codes, zq) = nearest(&z, &e).unwrap();
        assert_eq!(codes.shape(), &[n, h, w]);
        assert_eq!(zq.shape(), &[n, d, h, w]);
        let codes = codes.to_vec_u32().unwrap();
        let zq = zq.to_vec().unwrap();
        let dist = reference_distances(&zv, n, d, h * w, &ev);
        // |z|,|e| <= sqrt(d); f32 error of ||z||²+||e||²−2z·e is about 4·d·eps·(|z|²+|e|²).
        let tol = 8.0 * d as f64 * f32::EPSILON as f64 * (2.0 * d as f64);
        for (m, row) in dist.iter().enumerate() {
            let c = codes[m] as usize;
            let best = reference_argmin(row);
            assert!(
                row[c] - row[best as usize] <= tol,
                "n{n} d{d} {h}x{w} k{k}: position {m} chose {c} ({}) but {best} is at {}",
                row[c],
                row[best as usize]
            );
            let mut sorted = row.clone();
            sorted.sort_by(f64::total_cmp);
            if sorted.len() < 2 || sorted[1] - sorted[0] > tol {
                assert_eq!(c as u32, best, "position {m}");
            }
            let (b, s) = (m / (h * w), m % (h * w));
            for j in 0..d {
                assert_eq!(zq[(b * d + j) * h * w + s], ev[c * d + j]);
            }
        }
    }

    #[test]
    fn nearest_matches_reference_over_shapes() {
        let mut seed = 0;
        for &(n, d, h, w, k) in &[
            (1, 1, 1, 1, 1),
            (1, 3, 5, 7, 17),
            (2, 8, 4, 6, 64),
            (1, 16, 3, 3, 255),
            (1, 4, 2, 3, 257),
            (1, 32, 4, 4, 1000),
            (2, 5, 1, 17, 513),
            // 256 channels (the f16 models): 190 codes per invocation
            (1, 256, 2, 2, 600),
        ] {
            seed += 10;
            check_nearest(n, d, h, w, k, seed);
        }
    }

    #[test]
    fn distance_matmul_and_direct_search_agree_in_groups_of_images() {
        // 3 images in groups of 1 and 2 through the matmul path, against the direct kernel;
        // 600 codes of 256 channels (the f16 width), so that chunks split the codebook.
        let g = gpu();
        let (n, d, h, w, k) = (3, 256, 2, 3, 600);
        let zv = rand_vec(n * d * h * w, 7);
        let ev = rand_vec(k * d, 8);
        let z = Tensor::from_slice(&g, &zv, &[n, d, h, w]).unwrap();
        let e = Tensor::from_slice(&g, &ev, &[k, d]).unwrap();
        let empty = Tensor::empty(&g, &[n, h, w], DType::U32).unwrap();
        let direct = nearest_direct(&z, &e, empty).unwrap().to_vec_u32().unwrap();
        let dist = reference_distances(&zv, n, d, h * w, &ev);
        for group in [1, 2, 3] {
            let got = nearest_by_scores(&z, &e, group).unwrap();
            assert_eq!(got.shape(), &[n, h, w]);
            let got = got.to_vec_u32().unwrap();
            for (m, row) in dist.iter().enumerate() {
                let best = reference_argmin(row);
                assert_eq!(got[m], best, "group {group} position {m}");
                assert_eq!(direct[m], best, "direct, position {m}");
            }
        }
    }

    #[test]
    fn ties_go_to_the_lowest_index_within_and_across_chunks() {
        let g = gpu();
        let (d, k) = (4, 700);
        let mut ev = rand_vec(k * d, 3);
        // Rows 5, 9, 300 and 600 are one vector; z equals it, so all four tie at distance 0
        // (bitwise: the same arithmetic on the same numbers), across three chunks.
        let v = [0.25f32, -0.5, 0.75, 0.125];
        for r in [600, 300, 9, 5] {
            ev[r * d..r * d + d].copy_from_slice(&v);
        }
        let mut zv = vec![0.0f32; d * 2];
        for j in 0..d {
            zv[j * 2] = v[j];
            zv[j * 2 + 1] = ev[650 * d + j]; // second position: exactly row 650
        }
        let z = Tensor::from_slice(&g, &zv, &[1, d, 1, 2]).unwrap();
        let e = Tensor::from_slice(&g, &ev, &[k, d]).unwrap();
        let codes = nearest_codes(&z, &e).unwrap().to_vec_u32().unwrap();
        assert_eq!(codes, vec![5, 650]);
        // Ties between the two chunk winners: rows 299 (chunk 1) and 513 (chunk 2) only.
        let mut ev2 = vec![10.0f32; k * d];
        ev2[299 * d..299 * d + d].copy_from_slice(&v);
        ev2[513 * d..513 * d + d].copy_from_slice(&v);
        let e2 = Tensor::from_slice(&g, &ev2, &[k, d]).unwrap();
        let codes = nearest_codes(&z, &e2).unwrap().to_vec_u32().unwrap();
        assert_eq!(codes[0], 299);
    }

    /// Codes through one kernel's fused row-argmin epilogue and [`reduce`]: the scores are
    /// never written.
    fn fused_codes(z: &Tensor, e: &Tensor, v: super::super::matmul::Variant) -> Vec<u32> {
        use super::super::matmul::{matmul_row_argmin_variant, MatmulOpts};
        let (n, d, h, w) = (z.dim(0), z.dim(1), z.dim(2), z.dim(3));
        let o = MatmulOpts {
            trans_a: true,
            trans_b: true,
            alpha: Some(-2.0),
            bias: Some(&code_norms(e).unwrap()),
            ..Default::default()
        };
        let zs = z.reshape(&[n, d, h * w]).unwrap();
        let pairs = matmul_row_argmin_variant(&zs, e, &o, v)
            .unwrap()
            .unwrap_or_else(|| panic!("{v:?} has no row-argmin epilogue for {:?}", z.shape()));
        let codes = Tensor::empty(z.gpu(), &[n, h, w], DType::U32).unwrap();
        reduce(&pairs, n * h * w, pairs.dim(-2), &codes).unwrap();
        codes.to_vec_u32().unwrap()
    }

    #[test]
    fn fused_argmin_epilogue_matches_reference_on_each_kernel() {
        use super::super::matmul::{subgroup_supported, Variant};
        let g = gpu();
        let mut kernels = vec![Variant::Tile128];
        if subgroup_supported(&g) {
            kernels.extend([
                Variant::Subgroup,
                Variant::Subgroup16,
                Variant::Subgroup32,
                Variant::Subgroup32Wide,
            ]);
        }
        // Codes past whole blocks of 32, 64 and 128 columns, rows past whole tiles, several
        // images (a batch of transposed A's against one B), and a 16,384-code book.
        let shapes = [(2, 8, 4, 6, 200), (3, 4, 2, 10, 77), (1, 16, 2, 2, 16_384)];
        for (si, &(n, d, h, w, k)) in shapes.iter().enumerate() {
            let zv = rand_vec(n * d * h * w, 40 + si as u64);
            let mut ev = rand_vec(k * d, 50 + si as u64);
            // Position 0 is exactly code 61's vector, copied to codes in later blocks of
            // every kernel (and in an earlier column of a later tile128 block): all tie
            // at the lowest distance, bitwise, and code 61 must win.
            let hw = h * w;
            let v0: Vec<f32> = (0..d).map(|j| zv[j * hw]).collect();
            for r in [61, 63, 130, k - 1].into_iter().filter(|&r| r < k) {
                ev[r * d..(r + 1) * d].copy_from_slice(&v0);
            }
            let z = Tensor::from_slice(&g, &zv, &[n, d, h, w]).unwrap();
            let e = Tensor::from_slice(&g, &ev, &[k, d]).unwrap();
            let dist = reference_distances(&zv, n, d, hw, &ev);
            let tol = 8.0 * d as f64 * f32::EPSILON as f64 * (2.0 * d as f64);
            for &v in &kernels {
                let codes = fused_codes(&z, &e, v);
                assert_eq!(codes[0], 61, "{v:?} {:?}: the tie", (n, d, h, w, k));
                for (m, row) in dist.iter().enumerate() {
                    let (c, best) = (codes[m] as usize, reference_argmin(row) as usize);
                    assert!(
                        row[c] - row[best] <= tol,
                        "{v:?} {:?}: position {m} chose {c} ({}) over {best} ({})",
                        (n, d, h, w, k),
                        row[c],
                        row[best]
                    );
                }
            }
        }
    }

    #[test]
    fn the_f16_search_takes_the_fused_epilogue_on_subgroup_adapters() {
        // 256 channels, 16,384 codes, 16x16 positions: the default product has the epilogue
        // (no 64 MiB of scores) wherever the subgroup or 128-tile kernels are the default.
        use super::super::matmul::{matmul_row_argmin, subgroup_supported, MatmulOpts};
        let g = gpu();
        if !subgroup_supported(&g) {
            return;
        }
        let z = Tensor::zeros(&g, &[1, 256, 256]).unwrap();
        let e = Tensor::zeros(&g, &[16_384, 256]).unwrap();
        let o = MatmulOpts {
            trans_a: true,
            trans_b: true,
            ..Default::default()
        };
        let pairs = matmul_row_argmin(&z, &e, &o).unwrap();
        assert!(pairs.is_some_and(|p| p.shape()[..2] == [1, 256]));
    }

    #[test]
    fn argmax_and_gather_match_reference() {
        let g = gpu();
        for &(n, c, h, w) in &[(1, 1, 1, 1), (2, 17, 3, 5), (1, 300, 4, 4)] {
            let mut xv = rand_vec(n * c * h * w, c as u64);
            // A tie: channel 0 and the last channel share the max at position 0.
            if c > 1 {
                xv[0] = 5.0;
                xv[(c - 1) * h * w] = 5.0;
            }
            let x = Tensor::from_slice(&g, &xv, &[n, c, h, w]).unwrap();
            let got = argmax_channels(&x).unwrap().to_vec_u32().unwrap();
            for (m, &code) in got.iter().enumerate() {
                let (b, s) = (m / (h * w), m % (h * w));
                let vals: Vec<f64> = (0..c)
                    .map(|j| -(xv[(b * c + j) * h * w + s] as f64))
                    .collect();
                assert_eq!(
                    code,
                    reference_argmin(&vals),
                    "{n} {c} {h} {w} position {m}"
                );
            }
        }
        let ev = rand_vec(10 * 3, 1);
        let e = Tensor::from_slice(&g, &ev, &[10, 3]).unwrap();
        let cv = vec![9u32, 0, 4, 4, 7, 1];
        let codes = Tensor::from_u32(&g, &cv, &[2, 1, 3]).unwrap();
        let zq = gather(&codes, &e).unwrap();
        assert_eq!(zq.shape(), &[2, 3, 1, 3]);
        let zq = zq.to_vec().unwrap();
        for (m, &c) in cv.iter().enumerate() {
            let (b, s) = (m / 3, m % 3);
            for j in 0..3 {
                assert_eq!(zq[(b * 3 + j) * 3 + s], ev[c as usize * 3 + j]);
            }
        }
        assert!(check_codes(&[1, 10], 10)
            .unwrap_err()
            .to_string()
            .contains("code 10"));
    }

    #[test]
    fn more_than_65535_workgroups() {
        // 2049 x 2048 positions = 65,568 workgroups of 64 in every pass.
        let g = gpu();
        let (h, w) = (2049, 2048);
        let zv: Vec<f32> = (0..h * w).map(|i| (i % 3) as f32 + 0.1).collect();
        let z = Tensor::from_slice(&g, &zv, &[1, 1, h, w]).unwrap();
        let e = Tensor::from_slice(&g, &[2.0, 0.0, 1.0], &[3, 1]).unwrap();
        let (codes, zq) = nearest(&z, &e).unwrap();
        let codes = codes.to_vec_u32().unwrap();
        let zq = zq.to_vec().unwrap();
        for i in (0..h * w).step_by(101).chain([h * w - 1]) {
            let want = [1u32, 2, 0][i % 3];
            assert_eq!(codes[i], want, "position {i}");
            assert_eq!(zq[i], [0.0, 1.0, 2.0][i % 3]);
        }
    }

    #[test]
    fn shape_errors() {
        let g = gpu();
        let z = Tensor::zeros(&g, &[1, 4, 2, 2]).unwrap();
        let e = Tensor::zeros(&g, &[8, 3]).unwrap();
        let err = nearest(&z, &e).unwrap_err().to_string();
        assert!(
            err.contains("[8, 3]") && err.contains("4 channels"),
            "{err}"
        );
    }
}
