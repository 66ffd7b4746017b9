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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testutil::{gpu, rand_vec};

    #[test]
    fn lookup_is_the_same_on_both_tapes_and_training_needs_one_binding() {
        let g = gpu();
        let (v, d) = (7, 5);
        let data = rand_vec(v * d, 3);
        let ids = [4u32, 0, 6, 4];
        let want: Vec<f32> = ids
            .iter()
            .flat_map(|&i| data[i as usize * d..(i as usize + 1) * d].to_vec())
            .collect();
        let whole = Embedding {
            table: RowTable::from_tensor(&Tensor::from_slice(&g, &data, &[v, d]).unwrap()).unwrap(),
        };
        // 3 rows per chunk: three chunks.
        let chunked = Embedding {
            table: RowTable::from_slice_with_limit(&g, &data, v, d, (3 * d * 4) as u64).unwrap(),
        };
        assert_eq!(chunked.table.chunks().len(), 3);
        for e in [&whole, &chunked] {
            let tape = Tape::new();
            let y = e.forward(&tape, &g, &ids, &[2, 2]).unwrap();
            assert_eq!(y.shape(), [2, 2, d]);
            assert_eq!(y.value().to_vec().unwrap(), want);
        }
        let tape = Tape::training();
        let y = whole.forward(&tape, &g, &ids, &[4]).unwrap();
        assert_eq!(y.value().to_vec().unwrap(), want);
        let grads = tape.backward(&tape.sum(&y).unwrap()).unwrap();
        let gt = grads.param(&tape, &whole.table.chunks()[0]).unwrap();
        let gt = gt.to_vec().unwrap();
        // Row 4 was picked twice, rows 0 and 6 once, the others never.
        for (row, n) in [(0, 1.0), (1, 0.0), (4, 2.0), (6, 1.0)] {
            assert!(
                gt[row * d..(row + 1) * d].iter().all(|&x| x == n),
                "row {row}"
            );
        }
        let err = chunked
            .forward(&Tape::training(), &g, &ids, &[4])
            .expect_err("a chunked table cannot be trained");
        assert!(err.to_string().contains("one storage binding"), "{err}");
        let err = whole
            .forward(&Tape::training(), &g, &[9], &[1])
            .expect_err("id outside the table");
        assert!(err.to_string().contains('9'), "{err}");
    }
}
