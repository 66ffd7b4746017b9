//! `torch.nn.Embedding` on the tape.

use crate::autodiff::{Tape, Var};
use crate::ops::gather::{check_ids, gather_rows_from_ids, RowTable};
use crate::weights::Loader;
use crate::{Error, Gpu, Result, Tensor};

/// `nn.Embedding`: a `[V, D]` table of rows picked by id.
#[derive(Clone)]
pub struct Embedding {
    /// `weight` `[V, D]` in row chunks that each fit one storage binding (ViT-L's token
    /// table is larger than lavapipe's 128 MiB limit).
    pub table: RowTable,
}

impl Embedding {
    /// Loads `weight` `[rows, dim]` under `l`. A table that fits one binding is uploaded
    /// through the loader, so it is one of the model's parameters (training updates it in
    /// place); a larger one is uploaded in chunks and can only be read.
    pub fn load(l: &Loader, rows: usize, dim: usize) -> Result<Embedding> {
        let lim = l.gpu().limits();
        let fits =
            (rows * dim * 4) as u64 <= lim.max_storage_buffer_binding_size.min(lim.max_buffer_size);
        let table = if fits {
            RowTable::from_tensor(&l.tensor("weight", &[rows, dim])?)?
        } else {
            RowTable::from_slice(l.gpu(), &l.cpu("weight", &[rows, dim])?, rows, dim)?
        };
        Ok(Embedding { table })
    }

    /// The rows at `ids` (each below V), as `shape + [D]`. On a training tape the table
    /// is a parameter (its gradient scatter-adds into the rows) and must be one binding;
    /// otherwise the lookup reads the chunks directly.
    pub fn forward(&self, tape: &Tape, gpu: &Gpu, ids: &[u32], shape: &[usize]) -> Result<Var> {
        if !tape.is_training() {
            return Ok(tape.leaf(gather_rows_from_ids(gpu, &self.table, ids, shape)?, false));
        }
        let table = match self.table.chunks() {
            [one] => tape.param(one),
            _ => {
                return Err(Error::invalid(
                    "training an embedding needs its table in one storage binding",
                ))
            }
        };
        check_ids(ids, self.table.rows())?;
        tape.gather_rows(&table, &Tensor::from_u32(gpu, ids, shape)?)
    }
}
