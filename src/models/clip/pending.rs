//! Stand-ins for ops that are being written on another branch (gather, concat,
//! slice). Each has the signature the real op will have; when the op lands in `crate::ops`
//! the body here becomes a call to it (and then this file goes away).

use crate::tensor::{numel, DType};
use crate::{Error, Result, Tensor};

/// Rows `ids` of `table` `[V, D]`: returns `[ids.len(), D]`.
pub fn gather_rows(table: &Tensor, ids: &[u32]) -> Result<Tensor> {
    let (v, d) = (table.dim(0), table.dim(1));
    let out = Tensor::empty(table.gpu(), &[ids.len(), d], DType::F32)?;
    for (i, &id) in ids.iter().enumerate() {
        if id as usize >= v {
            return Err(Error::shape(format!("row {id} of a table of {v} rows")));
        }
        table.gpu().copy(
            table.raw(),
            (id as usize * d * 4) as u64,
            out.raw(),
            (i * d * 4) as u64,
            (d * 4) as u64,
        );
    }
    Ok(out)
}

/// Concatenates tensors along `axis` (other dims equal).
pub fn concat(parts: &[&Tensor], axis: usize) -> Result<Tensor> {
    let first = parts[0];
    let mut shape = first.shape().to_vec();
    shape[axis] = parts.iter().map(|p| p.dim(axis as isize)).sum();
    let out = Tensor::empty(first.gpu(), &shape, DType::F32)?;
    let outer = numel(&shape[..axis]);
    let row = numel(&shape[axis..]);
    let mut off = 0;
    for p in parts {
        let inner = numel(&p.shape()[axis..]);
        for o in 0..outer {
            first.gpu().copy(
                p.raw(),
                (o * inner * 4) as u64,
                out.raw(),
                ((o * row + off) * 4) as u64,
                (inner * 4) as u64,
            );
        }
        off += inner;
    }
    Ok(out)
}

/// `len` entries of `x` along `axis` starting at `start`.
pub fn slice(x: &Tensor, axis: usize, start: usize, len: usize) -> Result<Tensor> {
    let mut shape = x.shape().to_vec();
    let outer = numel(&shape[..axis]);
    let inner = numel(&shape[axis + 1..]);
    let full = shape[axis];
    shape[axis] = len;
    let out = Tensor::empty(x.gpu(), &shape, DType::F32)?;
    for o in 0..outer {
        x.gpu().copy(
            x.raw(),
            ((o * full + start) * inner * 4) as u64,
            out.raw(),
            (o * len * inner * 4) as u64,
            (len * inner * 4) as u64,
        );
    }
    Ok(out)
}
