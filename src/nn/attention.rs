//! Scaled dot-product attention over projected q/k/v, shared by CLIP's `CLIPAttention`
//! (many heads, causal in the text tower) and taming's `AttnBlock` (one head over the
//! H·W positions).

use crate::autodiff::{Tape, Var};
use crate::Result;

/// `softmax(q kᵀ / √D + mask) v` per head, on the `[B, T, H·D]` layout the projections
/// produce (`D` = width / `heads`); returns `[B, Tq, H·D]`. Without gradients this is the
/// fused online-softmax kernel reading that layout in place ([`Tape::attention_bthd`]).
pub fn attend(tape: &Tape, q: &Var, k: &Var, v: &Var, heads: usize, causal: bool) -> Result<Var> {
    let head_dim = q.shape().last().copied().unwrap_or(0) / heads.max(1);
    tape.attention_bthd(q, k, v, heads, causal, (head_dim as f32).powf(-0.5))
}

/// [`attend`] over the fused QKV projection's output `qkv` `[B, T, 3·H·D]` (rows
/// `[q | k | v]`): self-attention reading the three parts in place
/// ([`Tape::attention_qkv`]); returns `[B, T, H·D]`.
pub fn attend_qkv(tape: &Tape, qkv: &Var, heads: usize, causal: bool) -> Result<Var> {
    let head_dim = qkv.shape().last().copied().unwrap_or(0) / 3 / heads.max(1);
    tape.attention_qkv(qkv, heads, causal, (head_dim as f32).powf(-0.5))
}
