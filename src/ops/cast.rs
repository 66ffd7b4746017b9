//! f32 ↔ f16 tensor conversion (`shaders/cast.wgsl`): the edges of the `--precision f16`
//! inference path, where the CLIP encoder's activations are stored in f16 between kernels
//! (see `models::clip::encoder`).

use crate::gpu::{grid_1d, Kernel, Shader};
use crate::tensor::{DType, Tensor};
use crate::{Error, Result};

pub(crate) static SHADER: Shader<Params> = crate::shader!("cast", "f16", "grid");

/// Invocations per workgroup (`WG` in the shader).
const WG: u32 = 64;

crate::shader_params! {
    /// Mirrors `struct Params` in `shaders/cast.wgsl`.
    pub(crate) struct Params {
        n: u32,
        _pad0: u32,
        _pad1: u32,
        _pad2: u32,
    }
}

/// `x` converted to `to` (f32 or f16), same shape. The same dtype returns `x` itself (a
/// shared handle, no copy). f32 → f16 rounds to one of the two nearest f16 values and
/// saturates beyond f16's range (±65504); NaN stays NaN. f16 → f32 is exact. Needs the
/// device's `SHADER_F16` feature.
pub fn cast(x: &Tensor, to: DType) -> Result<Tensor> {
    let entry = match (x.dtype(), to) {
        (a, b) if a == b => return Ok(x.clone()),
        (DType::F32, DType::F16) => "to_f16",
        (DType::F16, DType::F32) => "to_f32",
        (a, b) => {
            return Err(Error::invalid(format!(
                "cast from {a:?} to {b:?}: only f32 <-> f16 conversions exist"
            )))
        }
    };
    let gpu = x.gpu();
    gpu.require_f16("an f16 conversion")?;
    let n = x.numel();
    if n > u32::MAX as usize - WG as usize {
        return Err(Error::shape(format!(
            "cast of {:?}: more than 2^32 elements",
            x.shape()
        )));
    }
    let y = Tensor::empty(gpu, x.shape(), to)?;
    if n == 0 {
        return Ok(y);
    }
    let p = Params {
        n: n as u32,
        _pad0: 0,
        _pad1: 0,
        _pad2: 0,
    };
    gpu.dispatch(
        &Kernel::new(&SHADER, entry),
        &p,
        &[x.binding(), y.binding()],
        grid_1d((n as u32).div_ceil(WG)),
    );
    Ok(y)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testutil::{gpu, rand_vec};

    /// Whether the test device can run f16 kernels (f16 tests are skipped where it cannot).
    fn has_f16() -> bool {
        let ok = gpu().features().contains(wgpu::Features::SHADER_F16);
        if !ok {
            eprintln!("skipped: the adapter has no SHADER_F16");
        }
        ok
    }

    /// The next f16 after `h` upwards (`up`) or downwards.
    fn toward(h: half::f16, up: bool) -> half::f16 {
        let b = h.to_bits();
        if b & 0x7fff == 0 {
            return half::f16::from_bits(if up { 0x0001 } else { 0x8001 });
        }
        // Up from a positive value or down from a negative one grows the magnitude.
        let neg = b & 0x8000 != 0;
        half::f16::from_bits(if up != neg { b + 1 } else { b - 1 })
    }

    #[test]
    fn round_trips_and_rounds_to_a_nearest_f16() {
        if !has_f16() {
            return;
        }
        let g = gpu();
        // Random values at several scales, f16's extremes, values past its range, a
        // subnormal, signed zeros and NaN; an odd count (f16 tensors are padded).
        let mut v: Vec<f32> = rand_vec(1001, 3)
            .iter()
            .enumerate()
            .map(|(i, x)| x * 10f32.powi((i % 9) as i32 - 4))
            .collect();
        v.extend([65504.0, -65504.0, 1e6, -1e6, 3e-6, 0.0, -0.0, f32::NAN]);
        let x = Tensor::from_slice(&g, &v, &[v.len()]).unwrap();
        let h = cast(&x, DType::F16).unwrap();
        assert_eq!((h.dtype(), h.shape()), (DType::F16, x.shape()));
        let got = h.to_vec().unwrap();
        for (i, (&x, &y)) in v.iter().zip(&got).enumerate() {
            if x.is_nan() {
                assert!(y.is_nan(), "NaN at {i} became {y}");
                continue;
            }
            // Saturated, then one of the two f16 values around it.
            let c = x.clamp(-65504.0, 65504.0);
            let near = half::f16::from_f32(c);
            let other = if near.to_f32() == c {
                near
            } else {
                toward(near, near.to_f32() < c)
            };
            assert!(
                y == near.to_f32() || y == other.to_f32(),
                "element {i}: {x} became {y}; the f16 values around it are {} and {}",
                near.to_f32(),
                other.to_f32()
            );
        }
        // f16 -> f32 is exact: back to the same values.
        let back = cast(&h, DType::F32).unwrap();
        assert_eq!(back.dtype(), DType::F32);
        let b = back.to_vec().unwrap();
        for (i, (&a, &b)) in got.iter().zip(&b).enumerate() {
            assert!(
                a == b || (a.is_nan() && b.is_nan()),
                "element {i}: {a} -> {b}"
            );
        }
        // Same dtype: the same tensor, no copy.
        assert_eq!(cast(&x, DType::F32).unwrap().buffer_id(), x.buffer_id());
        // Unsupported pairs and empty tensors.
        let u = Tensor::from_u32(&g, &[1, 2], &[2]).unwrap();
        assert!(cast(&u, DType::F32)
            .unwrap_err()
            .to_string()
            .contains("U32"));
        let e = Tensor::zeros(&g, &[0, 3]).unwrap();
        assert_eq!(cast(&e, DType::F16).unwrap().shape(), &[0, 3]);
    }
}
