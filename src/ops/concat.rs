//! Slicing and concatenation along one axis (`shaders/concat.wgsl`): both are copies of a
//! `[outer, len, inner]` block between tensors viewed as `[outer, A, inner]`, done by the
//! one `copy_slice` kernel, or by a plain buffer copy when the block is contiguous.

use crate::gpu::{grid_1d, Kernel, Shader};
use crate::tensor::Tensor;
use crate::{Error, Result};

/// The `override` constants the kernels below set.
mod ov {
    use crate::gpu::Override;
    pub(super) const WG: Override<u32> = Override::new("WG");
}

pub(crate) static SHADER: Shader<Params> = crate::shader!("concat", "grid", overrides = [ov::WG]);
const WG: u32 = 256;

crate::shader_params! {
    /// Mirrors `struct Params` in `shaders/concat.wgsl`.
    pub(crate) struct Params {
        n: u32,
        len: u32,
        inner: u32,
        a_src: u32,
        a_dst: u32,
        s0: u32,
        d0: u32,
        _pad: u32,
    }
}

/// Records `dst[:, d0..d0+len, :] = src[:, s0..s0+len, :]` for tensors viewed as
/// `[outer, A, inner]` around the same axis.
#[allow(clippy::too_many_arguments)]
fn copy_block(
    dst: &Tensor,
    src: &Tensor,
    outer: usize,
    inner: usize,
    a_dst: usize,
    a_src: usize,
    d0: usize,
    s0: usize,
    len: usize,
) -> Result<()> {
    let n = outer * len * inner;
    if n == 0 {
        return Ok(());
    }
    let gpu = dst.gpu();
    let es = dst.dtype().size() as usize;
    let (from, to) = (s0 * inner * es, d0 * inner * es);
    if outer == 1 && from % 4 == 0 && to % 4 == 0 {
        // One contiguous run of values: a buffer copy. Copies move whole 4-byte words: an
        // f16 run of odd length takes the value after it along, which lands in the padding
        // of `dst` or under the next run, copied after it.
        gpu.copy(
            src.raw(),
            from as u64,
            dst.raw(),
            to as u64,
            (n * es).div_ceil(4) as u64 * 4,
        );
        return Ok(());
    }
    if es != 4 {
        return Err(Error::invalid(format!(
            "slice/concat of {:?} tensors {:?} and {:?}: only whole runs starting on 4-byte \
             boundaries are copied for 2-byte elements",
            dst.dtype(),
            src.shape(),
            dst.shape()
        )));
    }
    if n > u32::MAX as usize - WG as usize || dst.numel() > u32::MAX as usize {
        return Err(Error::shape(format!(
            "copy of {n} values between {:?} and {:?} is too large",
            src.shape(),
            dst.shape()
        )));
    }
    let p = Params {
        n: n as u32,
        len: len as u32,
        inner: inner as u32,
        a_src: a_src as u32,
        a_dst: a_dst as u32,
        s0: s0 as u32,
        d0: d0 as u32,
        _pad: 0,
    };
    gpu.dispatch(
        &Kernel::new(&SHADER, "copy_slice").with(ov::WG, WG),
        &p,
        &[dst.binding(), src.binding()],
        grid_1d((n as u32).div_ceil(WG)),
    );
    Ok(())
}

/// `x[.., start..start+len, ..]` along `axis` (a copy; f32 or u32).
pub fn slice(x: &Tensor, axis: usize, start: usize, len: usize) -> Result<Tensor> {
    if axis >= x.rank() {
        return Err(Error::shape(format!(
            "slice along axis {axis} of a rank-{} tensor {:?}",
            x.rank(),
            x.shape()
        )));
    }
    let a = x.shape()[axis];
    if start > a || len > a - start {
        return Err(Error::shape(format!(
            "slice {start}..{} is outside axis {axis} of {:?} (size {a})",
            start.saturating_add(len),
            x.shape()
        )));
    }
    let mut shape = x.shape().to_vec();
    shape[axis] = len;
    let y = Tensor::empty(x.gpu(), &shape, x.dtype())?;
    let outer: usize = x.shape()[..axis].iter().product();
    let inner: usize = x.shape()[axis + 1..].iter().product();
    copy_block(&y, x, outer, inner, len, a, 0, start, len)?;
    Ok(y)
}

/// Backward of [`slice()`]'s `y = x[.., start..start+len, ..]`: `g` in the slice's place along
/// `axis` and zeros elsewhere. `g` is `x_shape` with `len` along `axis`; returns `x_shape`.
pub fn slice_backward(
    g: &Tensor,
    x_shape: &[usize],
    axis: usize,
    start: usize,
    len: usize,
) -> Result<Tensor> {
    let zeros = |n: usize| -> Result<Tensor> {
        let mut s = x_shape.to_vec();
        s[axis] = n;
        Tensor::zeros(g.gpu(), &s)
    };
    let after = x_shape[axis] - start - len;
    let mut all = Vec::with_capacity(3);
    if start > 0 {
        all.push(zeros(start)?);
    }
    all.push(g.clone());
    if after > 0 {
        all.push(zeros(after)?);
    }
    let refs: Vec<&Tensor> = all.iter().collect();
    concat(&refs, axis)
}

/// Concatenates `xs` along `axis`; all must share dtype, rank and every other dim.
pub fn concat(xs: &[&Tensor], axis: usize) -> Result<Tensor> {
    let first = xs
        .first()
        .ok_or_else(|| Error::invalid("concat of an empty list of tensors"))?;
    if axis >= first.rank() {
        return Err(Error::shape(format!(
            "concat along axis {axis} of rank-{} tensors",
            first.rank()
        )));
    }
    let mut total = 0;
    for (i, t) in xs.iter().enumerate() {
        let same_other_dims = t.rank() == first.rank()
            && (0..t.rank()).all(|d| d == axis || t.shape()[d] == first.shape()[d]);
        if !same_other_dims {
            return Err(Error::shape(format!(
                "concat along axis {axis}: input {i} {:?} does not match input 0 {:?} outside \
                 that axis",
                t.shape(),
                first.shape()
            )));
        }
        if t.dtype() != first.dtype() {
            return Err(Error::invalid(format!(
                "concat: input {i} is {:?} but input 0 is {:?}",
                t.dtype(),
                first.dtype()
            )));
        }
        total += t.shape()[axis];
    }
    let mut shape = first.shape().to_vec();
    shape[axis] = total;
    let y = Tensor::empty(first.gpu(), &shape, first.dtype())?;
    let outer: usize = shape[..axis].iter().product();
    let inner: usize = shape[axis + 1..].iter().product();
    let mut d0 = 0;
    for t in xs {
        let len = t.shape()[axis];
        copy_block(&y, t, outer, inner, total, len, d0, 0, len)?;
        d0 += len;
    }
    Ok(y)
}

/// Backward of [`concat()`]'s `y = [x_0, x_1, ..]` along `axis`: `dx_i` is the slice of `g`
/// where `x_i` was copied. `sizes[i]` is `x_i`'s size along `axis` (they sum to `g`'s);
/// `need[i]` says whether to compute `dx_i`.
pub fn concat_backward(
    g: &Tensor,
    sizes: &[usize],
    axis: usize,
    need: &[bool],
) -> Result<Vec<Option<Tensor>>> {
    let mut start = 0;
    let mut out = Vec::with_capacity(sizes.len());
    for (i, &n) in sizes.iter().enumerate() {
        out.push(need[i].then(|| slice(g, axis, start, n)).transpose()?);
        start += n;
    }
    Ok(out)
}

/// CPU reference of [`slice()`] on row-major data.
pub fn reference_slice<T: Copy>(
    x: &[T],
    shape: &[usize],
    axis: usize,
    start: usize,
    len: usize,
) -> Vec<T> {
    let a = shape[axis];
    let inner: usize = shape[axis + 1..].iter().product();
    let outer: usize = shape[..axis].iter().product();
    let mut out = Vec::with_capacity(outer * len * inner);
    for o in 0..outer {
        out.extend_from_slice(&x[(o * a + start) * inner..(o * a + start + len) * inner]);
    }
    out
}

/// CPU reference of [`concat()`]: `(data, shape)` pairs joined along `axis`.
pub fn reference_concat<T: Copy>(xs: &[(&[T], &[usize])], axis: usize) -> Vec<T> {
    let shape = xs[0].1;
    let outer: usize = shape[..axis].iter().product();
    let inner: usize = shape[axis + 1..].iter().product();
    let mut out = Vec::new();
    for o in 0..outer {
        for (x, s) in xs {
            let run = s[axis] * inner;
            out.extend_from_slice(&x[o * run..(o + 1) * run]);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testutil::{gpu, rand_vec};

    #[test]
    fn slices_match_reference() {
        let g = gpu();
        let cases: &[(&[usize], usize, usize, usize)] = &[
            (&[1], 0, 0, 1),
            (&[7], 0, 2, 3),
            (&[3, 17], 1, 5, 12),
            (&[3, 17], 0, 1, 2),
            (&[2, 50, 768], 1, 0, 1),
            (&[2, 50, 768], 1, 1, 49),
            (&[4, 65, 3, 5], 2, 1, 1),
            (&[1000, 3], 1, 2, 1),
            (&[5, 6], 1, 3, 0),
        ];
        for (ci, &(shape, axis, start, len)) in cases.iter().enumerate() {
            let n: usize = shape.iter().product();
            let xv = rand_vec(n, ci as u64);
            let x = Tensor::from_slice(&g, &xv, shape).unwrap();
            let y = slice(&x, axis, start, len).unwrap();
            let mut want_shape = shape.to_vec();
            want_shape[axis] = len;
            assert_eq!(y.shape(), want_shape.as_slice());
            assert_eq!(
                y.to_vec().unwrap(),
                reference_slice(&xv, shape, axis, start, len),
                "{shape:?} axis {axis} {start}+{len}"
            );
        }
    }

    #[test]
    fn concats_match_reference() {
        let g = gpu();
        let cases: &[(&[&[usize]], usize)] = &[
            (&[&[1], &[1]], 0),
            (&[&[2, 1, 768], &[2, 49, 768]], 1),
            (&[&[3, 5], &[3, 1], &[3, 17]], 1),
            (&[&[3, 5], &[4, 5]], 0),
            (&[&[2, 3, 4], &[2, 3, 0], &[2, 3, 65]], 2),
            (&[&[17, 2, 3]], 0),
        ];
        for (ci, &(shapes, axis)) in cases.iter().enumerate() {
            let data: Vec<Vec<f32>> = shapes
                .iter()
                .enumerate()
                .map(|(i, s)| rand_vec(s.iter().product(), (ci * 10 + i) as u64))
                .collect();
            let ts: Vec<Tensor> = shapes
                .iter()
                .zip(&data)
                .map(|(s, d)| Tensor::from_slice(&g, d, s).unwrap())
                .collect();
            let refs: Vec<&Tensor> = ts.iter().collect();
            let y = concat(&refs, axis).unwrap();
            let pairs: Vec<(&[f32], &[usize])> =
                data.iter().zip(shapes).map(|(d, s)| (&d[..], *s)).collect();
            assert_eq!(
                y.to_vec().unwrap(),
                reference_concat(&pairs, axis),
                "{shapes:?} axis {axis}"
            );
        }
    }

    #[test]
    fn u32_tensors() {
        let g = gpu();
        let a = Tensor::from_u32(&g, &[1, 2, 3, 4], &[2, 2]).unwrap();
        let b = Tensor::from_u32(&g, &[5, 6], &[2, 1]).unwrap();
        let c = concat(&[&a, &b], 1).unwrap();
        assert_eq!(c.dtype(), crate::DType::U32);
        assert_eq!(c.to_vec_u32().unwrap(), vec![1, 2, 5, 3, 4, 6]);
        assert_eq!(
            slice(&c, 1, 1, 2).unwrap().to_vec_u32().unwrap(),
            vec![2, 5, 4, 6]
        );
    }

    #[test]
    fn more_than_65535_workgroups() {
        // Two 8.6M-value halves joined along the last axis: 67,188 workgroups of 256 each.
        let g = gpu();
        let (rows, w) = (4300usize, 2000usize);
        let av: Vec<u32> = (0..(rows * w) as u32).collect();
        let a = Tensor::from_u32(&g, &av, &[rows, w]).unwrap();
        let c = concat(&[&a, &a], 1).unwrap().to_vec_u32().unwrap();
        for (r, col) in [(0, 0), (rows - 1, 2 * w - 1), (1234, 1999), (1234, 2000)] {
            assert_eq!(c[r * 2 * w + col], (r * w + col % w) as u32, "({r}, {col})");
        }
        let s = slice(&a, 1, 1, w - 1).unwrap().to_vec_u32().unwrap();
        assert_eq!(s[(rows - 1) * (w - 1) + w - 2], av[rows * w - 1]);
    }

    #[test]
    fn bad_arguments_are_reported() {
        let g = gpu();
        let a = Tensor::zeros(&g, &[2, 3]).unwrap();
        let b = Tensor::zeros(&g, &[3, 3]).unwrap();
        let e = concat(&[&a, &b], 1).unwrap_err().to_string();
        assert!(e.contains("input 1 [3, 3]"), "{e}");
        let e = concat(&[], 0).unwrap_err().to_string();
        assert!(e.contains("empty list"), "{e}");
        let u = Tensor::from_u32(&g, &[0; 6], &[2, 3]).unwrap();
        let e = concat(&[&a, &u], 0).unwrap_err().to_string();
        assert!(e.contains("U32"), "{e}");
        let e = slice(&a, 1, 2, 2).unwrap_err().to_string();
        assert!(e.contains("outside axis 1"), "{e}");
        let e = slice(&a, 2, 0, 1).unwrap_err().to_string();
        assert!(e.contains("axis 2"), "{e}");
    }
}
