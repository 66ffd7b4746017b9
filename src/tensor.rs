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
    pub fn empty(gpu: &Gpu, shape: &[usize], dtype: DType) -> Result<Tensor> {
        let bytes = (numel(shape) as u64)
            .checked_mul(4)
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

    /// An f32 tensor filled with `value`.
    pub fn full(gpu: &Gpu, shape: &[usize], value: f32) -> Result<Tensor> {
        Tensor::from_slice(gpu, &vec![value; numel(shape)], shape)
    }

    /// An f32 tensor of zeros.
    pub fn zeros(gpu: &Gpu, shape: &[usize]) -> Result<Tensor> {
        Tensor::full(gpu, shape, 0.0)
    }

    /// Downloads an f32 tensor (submits pending work and waits).
    pub fn to_vec(&self) -> Result<Vec<f32>> {
        if self.dtype != DType::F32 {
            return Err(Error::invalid("to_vec on a non-f32 tensor; use to_vec_u32"));
        }
        let bytes = self.gpu.read(self.raw(), 0, self.bytes())?;
        Ok(bytemuck::pod_collect_to_vec(&bytes))
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
        self.gpu.copy(src.raw(), 0, self.raw(), 0, self.bytes());
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
    /// Bytes of data (not of the pooled buffer).
    pub fn bytes(&self) -> u64 {
        self.numel() as u64 * 4
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
    /// This tensor as a kernel binding.
    pub fn binding(&self) -> Binding<'_> {
        Binding {
            buffer: self.raw(),
            size: self.bytes(),
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
    /// Errors unless the tensor is f32.
    pub fn expect_f32(&self, what: &str) -> Result<()> {
        if self.dtype != DType::F32 {
            return Err(Error::invalid(format!("{what}: expected an f32 tensor")));
        }
        Ok(())
    }
}
