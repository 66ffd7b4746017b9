//! GPU tensors: a pooled storage buffer plus a shape.
//!
//! Tensors are immutable values from the caller's side: ops read their inputs and return new
//! tensors. Clones share the buffer. Data stays on the GPU until [`Tensor::to_vec`].

use crate::gpu::{Binding, Gpu, PooledBuffer};
use crate::{Error, Result};
use std::sync::Arc;

/// Element type of a tensor's buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DType {
    /// 32-bit float, the reference precision.
    F32,
    /// 32-bit unsigned integer (token ids, codebook indices).
    U32,
    /// IEEE 16-bit float: storage of weights read by the f16 matmul kernels (the B operand,
    /// see [`crate::ops::matmul`]), which widen each value to f32 in registers. Needs the
    /// adapter's `SHADER_F16` feature to be read by a kernel; most ops take f32 only and
    /// return an error for it.
    F16,
}

impl DType {
    /// Bytes per element.
    pub fn size(self) -> u64 {
        match self {
            DType::F32 | DType::U32 => 4,
            DType::F16 => 2,
        }
    }

    /// Bytes a tensor of `numel` elements occupies in its buffer and binding: the data,
    /// rounded up to whole 16-byte units for f16, so that a kernel may view it as
    /// `array<vec4<f16>>` (8-byte elements) and buffer copies stay multiples of 4 bytes.
    /// 4-byte types are not padded.
    fn stored_bytes(self, numel: u64) -> Option<u64> {
        let bytes = numel.checked_mul(self.size())?;
        Some(match self {
            DType::F16 => bytes.div_ceil(16) * 16,
            DType::F32 | DType::U32 => bytes,
        })
    }
}

/// Precision of a model's weights on the GPU (`--precision`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Precision {
    /// Every weight in f32 (the reference).
    #[default]
    F32,
    /// Linear-layer weights stored in f16 and widened to f32 by the matmul kernels. Where
    /// nothing needs a gradient (embed, classify, search) the CLIP encoder's activations
    /// are stored in f16 between its kernels too, by default on GPUs only
    /// (`models::clip::encoder::f16_activations_default`); with gradients (generation)
    /// they stay f32. Biases, norm parameters, embeddings, arithmetic and accumulation are f32.
    /// Needs an adapter with `SHADER_F16`.
    F16,
}

impl Precision {
    /// The dtype linear-layer weights are stored in.
    pub fn weight_dtype(self) -> DType {
        match self {
            Precision::F32 => DType::F32,
            Precision::F16 => DType::F16,
        }
    }
}

/// A dense, row-major tensor in GPU memory.
#[derive(Clone)]
pub struct Tensor {
    gpu: Gpu,
    buf: Arc<PooledBuffer>,
    shape: Vec<usize>,
    dtype: DType,
}

impl std::fmt::Debug for Tensor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Tensor({:?}, {:?})", self.shape, self.dtype)
    }
}

/// Number of elements of a shape.
pub fn numel(shape: &[usize]) -> usize {
    shape.iter().product()
}

impl Tensor {
    /// An uninitialised tensor (contents are whatever the pooled buffer held).
    /// An f16 tensor needs the device's `SHADER_F16` feature (else an error naming the
    /// adapter).
    pub fn empty(gpu: &Gpu, shape: &[usize], dtype: DType) -> Result<Tensor> {
        if dtype == DType::F16 {
            gpu.require_f16("an f16 tensor")?;
        }
        let bytes = dtype
            .stored_bytes(numel(shape) as u64)
            .ok_or_else(|| Error::shape(format!("shape {shape:?} overflows")))?;
        let buf = gpu.alloc(bytes)?;
        Ok(Tensor {
            gpu: gpu.clone(),
            buf: Arc::new(buf),
            shape: shape.to_vec(),
            dtype,
        })
    }

    /// Uploads `data` (row-major) as an f32 tensor of `shape`.
    pub fn from_slice(gpu: &Gpu, data: &[f32], shape: &[usize]) -> Result<Tensor> {
        if data.len() != numel(shape) {
            return Err(Error::shape(format!(
                "{} values do not fill shape {shape:?} ({} elements)",
                data.len(),
                numel(shape)
            )));
        }
        let t = Tensor::empty(gpu, shape, DType::F32)?;
        gpu.write(t.raw(), 0, bytemuck::cast_slice(data));
        Ok(t)
    }

    /// Uploads `data` as a u32 tensor of `shape`.
    pub fn from_u32(gpu: &Gpu, data: &[u32], shape: &[usize]) -> Result<Tensor> {
        if data.len() != numel(shape) {
            return Err(Error::shape(format!(
                "{} values do not fill shape {shape:?}",
                data.len()
            )));
        }
        let t = Tensor::empty(gpu, shape, DType::U32)?;
        gpu.write(t.raw(), 0, bytemuck::cast_slice(data));
        Ok(t)
    }

    /// Uploads `data` as an f16 tensor of `shape` (the buffer's padding past the data is
    /// zeros). Needs the device's `SHADER_F16` feature.
    pub fn from_f16(gpu: &Gpu, data: &[half::f16], shape: &[usize]) -> Result<Tensor> {
        if data.len() != numel(shape) {
            return Err(Error::shape(format!(
                "{} values do not fill shape {shape:?}",
                data.len()
            )));
        }
        let t = Tensor::empty(gpu, shape, DType::F16)?;
        let mut bytes: Vec<u8> = data
            .iter()
            .flat_map(|h| h.to_bits().to_le_bytes())
            .collect();
        bytes.resize(t.stored_bytes() as usize, 0);
        gpu.write(t.raw(), 0, &bytes);
        Ok(t)
    }

    /// Rounds `data` to f16 (round to nearest even; values past ±65504 become ±inf) and
    /// uploads it as an f16 tensor of `shape`.
    pub fn from_f32_as_f16(gpu: &Gpu, data: &[f32], shape: &[usize]) -> Result<Tensor> {
        let h: Vec<half::f16> = data.iter().map(|&x| half::f16::from_f32(x)).collect();
        Tensor::from_f16(gpu, &h, shape)
    }

    /// An f32 tensor filled with `value`.
    pub fn full(gpu: &Gpu, shape: &[usize], value: f32) -> Result<Tensor> {
        Tensor::from_slice(gpu, &vec![value; numel(shape)], shape)
    }

    /// An f32 tensor of zeros.
    pub fn zeros(gpu: &Gpu, shape: &[usize]) -> Result<Tensor> {
        Tensor::full(gpu, shape, 0.0)
    }

    /// Downloads an f32 tensor (submits pending work and waits). An f16 tensor's values
    /// are widened to f32 on the CPU (exactly), so checkpoint writers and tests read both
    /// alike; a u32 tensor is an error (use [`Tensor::to_vec_u32`]).
    pub fn to_vec(&self) -> Result<Vec<f32>> {
        match self.dtype {
            DType::F32 => {
                let bytes = self.gpu.read(self.raw(), 0, self.bytes())?;
                Ok(bytemuck::pod_collect_to_vec(&bytes))
            }
            DType::F16 => {
                let bytes = self.gpu.read(self.raw(), 0, self.bytes())?;
                let bits: Vec<u16> = bytemuck::pod_collect_to_vec(&bytes);
                Ok(bits
                    .into_iter()
                    .map(|b| half::f16::from_bits(b).to_f32())
                    .collect())
            }
            DType::U32 => Err(Error::invalid("to_vec on a u32 tensor; use to_vec_u32")),
        }
    }

    /// Downloads a u32 tensor.
    pub fn to_vec_u32(&self) -> Result<Vec<u32>> {
        if self.dtype != DType::U32 {
            return Err(Error::invalid("to_vec_u32 on a non-u32 tensor"));
        }
        let bytes = self.gpu.read(self.raw(), 0, self.bytes())?;
        Ok(bytemuck::pod_collect_to_vec(&bytes))
    }

    /// Overwrites this tensor's values with `src`'s (same element count), in stream order.
    /// Every clone of this tensor sees the new values: use it for state such as parameters.
    pub fn assign(&self, src: &Tensor) -> Result<()> {
        if src.numel() != self.numel() || src.dtype != self.dtype {
            return Err(Error::shape(format!(
                "assign: {:?} {:?} into {:?} {:?}",
                src.shape, src.dtype, self.shape, self.dtype
            )));
        }
        self.gpu
            .copy(src.raw(), 0, self.raw(), 0, self.stored_bytes());
        self.gpu.invalidate_derived(self);
        Ok(())
    }

    /// The same buffer viewed with another shape of the same element count.
    pub fn reshape(&self, shape: &[usize]) -> Result<Tensor> {
        if numel(shape) != self.numel() {
            return Err(Error::shape(format!(
                "cannot reshape {:?} ({} elements) to {shape:?} ({} elements)",
                self.shape,
                self.numel(),
                numel(shape)
            )));
        }
        Ok(Tensor {
            shape: shape.to_vec(),
            ..self.clone()
        })
    }

    /// The shape.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }
    /// Size of dimension `i`; negative counts from the end.
    pub fn dim(&self, i: isize) -> usize {
        let r = self.shape.len() as isize;
        self.shape[(if i < 0 { r + i } else { i }) as usize]
    }
    /// Number of dimensions.
    pub fn rank(&self) -> usize {
        self.shape.len()
    }
    /// Number of elements.
    pub fn numel(&self) -> usize {
        numel(&self.shape)
    }
    /// Element type.
    pub fn dtype(&self) -> DType {
        self.dtype
    }
    /// Bytes of data (not of the pooled buffer): 4 per element, 2 for f16.
    pub fn bytes(&self) -> u64 {
        self.numel() as u64 * self.dtype.size()
    }
    /// Bytes of data plus the padding an f16 tensor keeps to whole 16-byte units
    /// ([`Tensor::binding`]'s size; equal to [`Tensor::bytes`] for 4-byte types).
    pub(crate) fn stored_bytes(&self) -> u64 {
        // Cannot overflow: `empty` computed the same product when it allocated the buffer.
        self.dtype
            .stored_bytes(self.numel() as u64)
            .unwrap_or(u64::MAX)
    }
    /// The device this tensor lives on.
    pub fn gpu(&self) -> &Gpu {
        &self.gpu
    }
    /// The shared buffer (the derived-tensor cache keeps weak references to it).
    pub(crate) fn buffer_arc(&self) -> &Arc<PooledBuffer> {
        &self.buf
    }

    /// A tensor over an existing buffer (the derived-tensor cache's entries).
    pub(crate) fn from_parts(
        gpu: &Gpu,
        buf: Arc<PooledBuffer>,
        shape: &[usize],
        dtype: DType,
    ) -> Tensor {
        Tensor {
            gpu: gpu.clone(),
            buf,
            shape: shape.to_vec(),
            dtype,
        }
    }

    /// An identity for the underlying buffer: equal for clones and reshapes of one tensor.
    pub fn buffer_id(&self) -> usize {
        Arc::as_ptr(&self.buf) as usize
    }
    pub(crate) fn raw(&self) -> &wgpu::Buffer {
        self.buf.raw()
    }
    /// This tensor as a kernel binding (an f16 tensor's with its padding to 16 bytes, so
    /// that it may be viewed as `array<vec4<f16>>`).
    pub fn binding(&self) -> Binding<'_> {
        Binding {
            buffer: self.raw(),
            size: self.stored_bytes(),
        }
    }
    /// This tensor as a binding rounded up to whole 16-byte units, for kernels that view it
    /// as `array<vec4<f32>>`. The tail past the data reads as whatever the pooled buffer
    /// holds (pool size classes are multiples of 64 bytes, so the range stays inside the
    /// buffer); such kernels mask it.
    pub(crate) fn binding_vec4(&self) -> Binding<'_> {
        Binding {
            buffer: self.raw(),
            size: self.bytes().div_ceil(16).max(1) * 16,
        }
    }
    /// Errors unless the elements are 4 bytes (f32 or u32): for the copy kernels, which
    /// move 32-bit words and would misplace f16 values.
    pub(crate) fn expect_4_byte(&self, what: &str) -> Result<()> {
        if self.dtype.size() != 4 {
            return Err(Error::invalid(format!(
                "{what}: takes f32 or u32 tensors, got {:?}",
                self.dtype
            )));
        }
        Ok(())
    }
    /// Errors unless the tensor is f32.
    pub fn expect_f32(&self, what: &str) -> Result<()> {
        if self.dtype != DType::F32 {
            return Err(Error::invalid(format!(
                "{what}: expected an f32 tensor, got {:?}",
                self.dtype
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_shader_f16_f16_tensors_and_models_are_clear_errors() {
        // A device opened with SHADER_F16 left off, as on an adapter without it.
        let opts = crate::DeviceOptions::from_env().unwrap();
        let g = Gpu::new_without(&opts, wgpu::Features::SHADER_F16).unwrap();
        let name = g.info().name.clone();
        let e = Tensor::from_f32_as_f16(&g, &[1.0; 4], &[4])
            .unwrap_err()
            .to_string();
        assert!(e.contains("SHADER_F16") && e.contains(&name), "{e}");
        let dir = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/clip/tiny_quickgelu"
        );
        let e = crate::models::clip::ClipModel::load_with(dir, &g, Precision::F16)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("--precision f16") && e.contains(&name) && e.contains("--precision f32"),
            "{e}"
        );
        // f32 still loads on it.
        crate::models::clip::ClipModel::load_with(dir, &g, Precision::F32).unwrap();
    }

    #[test]
    fn f16_tensors_are_padded_to_16_bytes_and_read_back_widened() {
        let g = crate::ops::testutil::gpu();
        if !g.features().contains(wgpu::Features::SHADER_F16) {
            return;
        }
        let v = [1.0f32, -2.5, 65504.0, 1e-3, 0.1, 3.0, 7.0];
        let t = Tensor::from_f32_as_f16(&g, &v, &[7]).unwrap();
        assert_eq!(
            (t.dtype(), t.bytes(), t.binding().size),
            (DType::F16, 14, 16)
        );
        let want: Vec<f32> = v.iter().map(|&x| half::f16::from_f32(x).to_f32()).collect();
        assert_eq!(t.to_vec().unwrap(), want);
        // An f16 copy of odd length through slice and concat (whole 4-byte words).
        let s = crate::ops::concat::slice(&t, 0, 2, 5).unwrap();
        assert_eq!(s.to_vec().unwrap(), want[2..]);
        let six = crate::ops::concat::slice(&t, 0, 0, 6).unwrap();
        let c = crate::ops::concat::concat(&[&six, &six, &t], 0).unwrap();
        assert_eq!(
            c.to_vec().unwrap(),
            [&want[..6], &want[..6], &want[..]].concat()
        );
        // A run starting between two words cannot be a word copy: an error, not a misread.
        assert!(crate::ops::concat::slice(&t, 0, 1, 2).is_err());
        assert!(crate::ops::concat::concat(&[&t, &t], 0).is_err());
        assert!(crate::ops::permute::permute(&t.reshape(&[7, 1]).unwrap(), &[1, 0]).is_ok());
        let m = Tensor::from_f32_as_f16(&g, &[0.0; 6], &[2, 3]).unwrap();
        let e = crate::ops::permute::permute(&m, &[1, 0])
            .unwrap_err()
            .to_string();
        assert!(e.contains("F16"), "{e}");
    }
}
