//! Reverse-mode autodiff over GPU tensors: the tape wires ops together, the ops own the maths.
//!
//! Each op's forward and backward rule live side by side in `src/ops/<op>.rs`
//! (`ops::matmul::matmul` / `ops::matmul::matmul_backward`, and so on; elementwise rules in
//! `ops::elementwise`, losses in `ops::loss`). A [`Tape`] method only wires: it computes the
//! forward with the ordinary kernels, saves what the backward function needs (inputs or
//! outputs) and pushes a node whose closure calls that function. A few ops have no rule of
//! their own because they are recorded as compositions of others (attention on
//! `[B, H, T, D]` as matmul → softmax → matmul, spherical distance, mean) or because their gradient is the identity or a
//! reshape (`straight_through`, `reshape`).
//!
//! [`Tape::backward`] walks the nodes in reverse creation order (a valid topological order,
//! since an op's inputs exist before it), calls each closure once with the gradient of its
//! output, and adds the results into its inputs' gradients. A closure is consumed when it
//! runs, so saved activations are released as soon as the backward pass is past them.

use crate::ops::elementwise::{self, BinaryOp, UnaryOp};
use crate::ops::matmul::{matmul, matmul_backward, MatmulOpts};
use crate::ops::Act;
use crate::{Error, Result, Tensor};
use std::cell::RefCell;
use std::collections::HashMap;

/// A node's backward rule: given its output's gradient and which parents need a gradient,
/// returns one gradient (or `None`) per parent. Skipping unneeded parents matters: frozen
/// weights (VQGAN+CLIP) would otherwise cost a weight-gradient product per layer.
type Backward = Box<dyn FnOnce(&Tensor, &[bool]) -> Result<Vec<Option<Tensor>>>>;

struct Node {
    parents: Vec<usize>,
    needs_grad: bool,
    backward: Option<Backward>,
}

/// A tensor recorded on a tape. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Var {
    id: usize,
    needs_grad: bool,
    value: Tensor,
}

impl Var {
    /// The forward value.
    pub fn value(&self) -> &Tensor {
        &self.value
    }
    /// The shape of the value.
    pub fn shape(&self) -> &[usize] {
        self.value.shape()
    }
    /// The node id on its tape.
    pub fn id(&self) -> usize {
        self.id
    }
    /// Whether a backward pass computes a gradient for this value (a leaf asked for one,
    /// or an op with such an input).
    pub fn needs_grad(&self) -> bool {
        self.needs_grad
    }
}

/// Gradients of a backward pass, by the [`Var`] they belong to.
#[derive(Debug)]
pub struct Grads(HashMap<usize, Tensor>);

impl Grads {
    /// The gradient of `v`, if it was reached.
    pub fn get(&self, v: &Var) -> Option<&Tensor> {
        self.0.get(&v.id)
    }
    /// The gradient of a parameter taken with [`Tape::param`] on `tape`.
    pub fn param(&self, tape: &Tape, t: &Tensor) -> Option<&Tensor> {
        let id = tape.params.borrow().get(&t.buffer_id())?.id;
        self.0.get(&id)
    }
    /// Removes and returns the gradient of `v`.
    pub fn take(&mut self, v: &Var) -> Option<Tensor> {
        self.0.remove(&v.id)
    }
}

/// Whether any of `vars` (and the optional one, e.g. a bias) needs a gradient: when none
/// does, an op records nothing and may take the fused inference kernel.
fn any_needs_grad(vars: &[&Var], optional: Option<&Var>) -> bool {
    vars.iter().any(|v| v.needs_grad) || optional.is_some_and(|v| v.needs_grad)
}

/// Records ops for one forward pass. Build a new tape for each step.
#[derive(Default)]
pub struct Tape {
    nodes: RefCell<Vec<Node>>,
    /// Parameter leaves by buffer identity, so a weight used twice is one leaf.
    params: RefCell<HashMap<usize, Var>>,
    training: bool,
}

impl Tape {
    /// An empty tape for inference or latent optimisation: model parameters taken with
    /// [`Tape::param`] need no gradient.
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty tape for training: parameters taken with [`Tape::param`] get gradients.
    pub fn training() -> Self {
        Tape {
            training: true,
            ..Self::default()
        }
    }

    /// True for a [`Tape::training`] tape.
    pub fn is_training(&self) -> bool {
        self.training
    }

    /// A model parameter as a leaf (one leaf per parameter however often it is used);
    /// it needs a gradient on a training tape. Read its gradient with [`Grads::param`].
    pub fn param(&self, t: &Tensor) -> Var {
        let key = t.buffer_id();
        if let Some(v) = self.params.borrow().get(&key) {
            if v.shape() == t.shape() {
                return v.clone();
            }
        }
        let v = self.leaf(t.clone(), self.training);
        self.params.borrow_mut().insert(key, v.clone());
        v
    }

    fn push(&self, value: Tensor, parents: &[&Var], backward: Backward) -> Var {
        let needs_grad = any_needs_grad(parents, None);
        let mut nodes = self.nodes.borrow_mut();
        let id = nodes.len();
        nodes.push(Node {
            parents: parents.iter().map(|p| p.id).collect(),
            needs_grad,
            backward: needs_grad.then_some(backward),
        });
        Var {
            id,
            needs_grad,
            value,
        }
    }

    /// A leaf: a parameter or input. `needs_grad` leaves get gradients from [`Tape::backward`].
    pub fn leaf(&self, value: Tensor, needs_grad: bool) -> Var {
        let mut nodes = self.nodes.borrow_mut();
        let id = nodes.len();
        nodes.push(Node {
            parents: vec![],
            needs_grad,
            backward: None,
        });
        Var {
            id,
            needs_grad,
            value,
        }
    }

    /// Number of recorded nodes.
    pub fn len(&self) -> usize {
        self.nodes.borrow().len()
    }

    /// True when nothing is recorded.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// `a + b` with broadcasting. An operand that needs a gradient may only be broadcast over
    /// leading dims (a bias, say); constants may broadcast any way.
    pub fn add(&self, a: &Var, b: &Var) -> Result<Var> {
        let y = elementwise::add(&a.value, &b.value)?;
        let (sa, sb) = (a.shape().to_vec(), b.shape().to_vec());
        Ok(self.push(
            y,
            &[a, b],
            Box::new(move |g, need| {
                let (da, db) = elementwise::add_backward(g, &sa, &sb, [need[0], need[1]])?;
                Ok(vec![da, db])
            }),
        ))
    }

    /// `a - b` (same broadcasting as [`Tape::add`]).
    pub fn sub(&self, a: &Var, b: &Var) -> Result<Var> {
        let y = elementwise::binary(&a.value, &b.value, BinaryOp::Sub)?;
        let (sa, sb) = (a.shape().to_vec(), b.shape().to_vec());
        Ok(self.push(
            y,
            &[a, b],
            Box::new(move |g, need| {
                let (da, db) = elementwise::sub_backward(g, &sa, &sb, [need[0], need[1]])?;
                Ok(vec![da, db])
            }),
        ))
    }

    /// `a * b` elementwise (same broadcasting as [`Tape::add`]).
    pub fn mul(&self, a: &Var, b: &Var) -> Result<Var> {
        let y = elementwise::mul(&a.value, &b.value)?;
        let (av, bv) = (a.value.clone(), b.value.clone());
        Ok(self.push(
            y,
            &[a, b],
            Box::new(move |g, need| {
                let (da, db) = elementwise::mul_backward(&av, &bv, g, [need[0], need[1]])?;
                Ok(vec![da, db])
            }),
        ))
    }

    /// `x * scale + shift`.
    pub fn affine(&self, x: &Var, scale: f32, shift: f32) -> Result<Var> {
        let y = elementwise::unary(&x.value, UnaryOp::Affine { scale, shift })?;
        Ok(self.push(
            y,
            &[x],
            Box::new(move |g, _need| Ok(vec![Some(elementwise::affine_backward(g, scale)?)])),
        ))
    }

    /// An activation function.
    pub fn act(&self, x: &Var, act: Act) -> Result<Var> {
        let y = elementwise::unary(&x.value, UnaryOp::Act(act))?;
        let xv = x.value.clone();
        Ok(self.push(
            y,
            &[x],
            Box::new(move |g, _need| Ok(vec![Some(elementwise::act_backward(&xv, g, act)?)])),
        ))
    }

    /// `x²` elementwise.
    pub fn square(&self, x: &Var) -> Result<Var> {
        let y = elementwise::unary(&x.value, UnaryOp::Square)?;
        let xv = x.value.clone();
        Ok(self.push(
            y,
            &[x],
            Box::new(move |g, _need| Ok(vec![Some(elementwise::square_backward(&xv, g)?)])),
        ))
    }

    /// The sum of every element, as a `[1]` tensor.
    pub fn sum(&self, x: &Var) -> Result<Var> {
        let y = crate::ops::reduce::sum_all(&x.value)?;
        let shape = x.shape().to_vec();
        Ok(self.push(
            y,
            &[x],
            Box::new(move |g, _need| {
                Ok(vec![Some(crate::ops::reduce::sum_all_backward(g, &shape)?)])
            }),
        ))
    }

    /// The mean of every element, as a `[1]` tensor.
    pub fn mean(&self, x: &Var) -> Result<Var> {
        let n = x.value.numel().max(1) as f32;
        let s = self.sum(x)?;
        self.affine(&s, 1.0 / n, 0.0)
    }

    /// `act(alpha · op(A) @ op(B) + bias)` as in [`matmul`]; B may be a rank-2 weight shared
    /// over A's batch dims. The activation is recorded as its own node so that its backward
    /// sees the pre-activation.
    pub fn matmul(&self, a: &Var, b: &Var, bias: Option<&Var>, o: &MatmulOpts) -> Result<Var> {
        if o.residual.is_some() || o.bias.is_some() {
            return Err(Error::invalid(
                "Tape::matmul takes its bias as a Var and no residual (use Tape::add)",
            ));
        }
        if !any_needs_grad(&[a, b], bias) {
            // Inference: the fused epilogue, nothing to record.
            let fused = MatmulOpts {
                bias: bias.map(|b| &b.value),
                ..*o
            };
            return Ok(self.leaf(matmul(&a.value, &b.value, &fused)?, false));
        }
        let plain = MatmulOpts {
            act: Act::None,
            bias: bias.map(|b| &b.value),
            ..*o
        };
        let y = matmul(&a.value, &b.value, &plain)?;
        let (av, bv) = (a.value.clone(), b.value.clone());
        let (trans_a, trans_b, alpha) = (o.trans_a, o.trans_b, o.alpha.unwrap_or(1.0));
        let has_bias = bias.is_some();
        let mut parents = vec![a, b];
        if let Some(bias) = bias {
            parents.push(bias);
        }
        let out = self.push(
            y,
            &parents,
            Box::new(move |g, need| {
                let o = MatmulOpts {
                    trans_a,
                    trans_b,
                    alpha: Some(alpha),
                    ..Default::default()
                };
                let need = [need[0], need[1], has_bias && need[2]];
                let r = matmul_backward(&av, &bv, g, &o, need)?;
                let mut out = vec![r.da, r.db];
                if has_bias {
                    out.push(r.dbias);
                }
                Ok(out)
            }),
        );
        if o.act == Act::None {
            Ok(out)
        } else {
            self.act(&out, o.act)
        }
    }

    /// `act(x @ weightᵀ + bias)` with a PyTorch `Linear` weight `[out, in]`; `x`: `[.., in]`.
    pub fn linear(&self, x: &Var, weight: &Var, bias: Option<&Var>, act: Act) -> Result<Var> {
        self.matmul(
            x,
            weight,
            bias,
            &MatmulOpts {
                trans_b: true,
                act,
                ..Default::default()
            },
        )
    }

    /// `act(x @ weightᵀ + bias) + residual` ([`Tape::linear`] followed by a residual
    /// addition). When nothing needs a gradient this is one matmul whose epilogue adds the
    /// bias, applies the activation and adds the residual, as the inference kernels do.
    /// With gradients and no activation (CLIP's `out_proj` and `fc2`) the residual stays in
    /// the epilogue too: the sum's gradient is the output's for both terms and the
    /// product's backward needs only its operands, so no separate add pass (two reads, one
    /// write of the activations) is recorded. Only an activation, whose backward needs the
    /// pre-activation, or a broadcast residual records the add as its own node.
    pub fn linear_residual(
        &self,
        x: &Var,
        weight: &Var,
        bias: Option<&Var>,
        act: Act,
        residual: &Var,
    ) -> Result<Var> {
        let grad = any_needs_grad(&[x, weight, residual], bias);
        if !grad {
            let fused = MatmulOpts {
                trans_b: true,
                act,
                bias: bias.map(|b| &b.value),
                residual: Some(&residual.value),
                ..Default::default()
            };
            return Ok(self.leaf(matmul(&x.value, &weight.value, &fused)?, false));
        }
        let out_shape: Vec<usize> = match x.shape().split_last() {
            Some((_, lead)) => lead.iter().copied().chain([weight.value.dim(0)]).collect(),
            None => Vec::new(),
        };
        if act != Act::None || weight.shape().len() != 2 || residual.shape() != out_shape {
            let y = self.linear(x, weight, bias, act)?;
            return self.add(residual, &y);
        }
        let fused = MatmulOpts {
            trans_b: true,
            bias: bias.map(|b| &b.value),
            residual: Some(&residual.value),
            ..Default::default()
        };
        let y = matmul(&x.value, &weight.value, &fused)?;
        let (xv, wv) = (x.value.clone(), weight.value.clone());
        let has_bias = bias.is_some();
        let mut parents = vec![x, weight, residual];
        parents.extend(bias);
        Ok(self.push(
            y,
            &parents,
            Box::new(move |g, need| {
                // y = x @ Wᵀ + b + residual: matmul's rule for x, W, b; g itself for residual.
                let o = MatmulOpts {
                    trans_b: true,
                    ..Default::default()
                };
                let r = matmul_backward(&xv, &wv, g, &o, [need[0], need[1], has_bias && need[3]])?;
                let mut out = vec![r.da, r.db, need[2].then(|| g.clone())];
                if has_bias {
                    out.push(r.dbias);
                }
                Ok(out)
            }),
        ))
    }

    /// The same value viewed with another shape.
    pub fn reshape(&self, x: &Var, shape: &[usize]) -> Result<Var> {
        let y = x.value.reshape(shape)?;
        let orig = x.shape().to_vec();
        Ok(self.push(
            y,
            &[x],
            Box::new(move |g, _need| Ok(vec![Some(g.reshape(&orig)?)])),
        ))
    }

    /// `x.permute(perm)`.
    pub fn permute(&self, x: &Var, perm: &[usize]) -> Result<Var> {
        use crate::ops::permute::{permute, permute_backward};
        let y = permute(&x.value, perm)?;
        let perm = perm.to_vec();
        Ok(self.push(
            y,
            &[x],
            Box::new(move |g, _need| Ok(vec![Some(permute_backward(g, &perm)?)])),
        ))
    }

    /// LayerNorm over the last axis with affine parameters.
    pub fn layer_norm(&self, x: &Var, gamma: &Var, beta: &Var, eps: f32) -> Result<Var> {
        let y = crate::ops::layer_norm::layer_norm(
            &x.value,
            Some(&gamma.value),
            Some(&beta.value),
            eps,
        )?;
        let (xv, gv) = (x.value.clone(), gamma.value.clone());
        Ok(self.push(
            y,
            &[x, gamma, beta],
            Box::new(move |g, _need| {
                let r = crate::ops::layer_norm::layer_norm_backward(&xv, Some(&gv), g, eps)?;
                Ok(vec![Some(r.dx), Some(r.dgamma), Some(r.dbeta)])
            }),
        ))
    }

    /// `softmax(scale · x)` over the last axis.
    pub fn softmax(&self, x: &Var, scale: f32) -> Result<Var> {
        let y = crate::ops::softmax::softmax_scaled(&x.value, scale)?;
        let yv = y.clone();
        Ok(self.push(
            y,
            &[x],
            Box::new(move |g, _need| {
                Ok(vec![Some(crate::ops::softmax::softmax_backward(
                    &yv, g, scale,
                )?)])
            }),
        ))
    }

    /// Each row (last axis) divided by its L2 norm.
    pub fn l2_normalize(&self, x: &Var) -> Result<Var> {
        use crate::ops::l2_normalize::{l2_normalize, l2_normalize_backward};
        let (y, norm) = l2_normalize(&x.value)?;
        let yv = y.clone();
        Ok(self.push(
            y,
            &[x],
            Box::new(move |g, _need| Ok(vec![Some(l2_normalize_backward(&yv, &norm, g)?)])),
        ))
    }

    /// VQGAN+CLIP's spherical distance between every row of `a` `[N, D]` and of `b`
    /// `[K, D]`: `2·asin(‖â − b̂‖/2)² = θ²/2`, as `[N, K]` (the rows need not be normalised).
    pub fn spherical_distance(&self, a: &Var, b: &Var) -> Result<Var> {
        let (an, bn) = (self.l2_normalize(a)?, self.l2_normalize(b)?);
        let cos = self.matmul(
            &an,
            &bn,
            None,
            &MatmulOpts {
                trans_b: true,
                ..Default::default()
            },
        )?;
        let y = elementwise::unary(&cos.value, UnaryOp::HalfSquaredAngle)?;
        let c = cos.value.clone();
        Ok(self.push(
            y,
            &[&cos],
            Box::new(move |g, _need| {
                Ok(vec![Some(elementwise::half_squared_angle_backward(&c, g)?)])
            }),
        ))
    }

    /// Identity forward; backward passes the gradient only where `x > stop` (the gradient of
    /// `max(x, stop)`, as VQGAN+CLIP's `replace_grad(dists, max(dists, stop))`).
    pub fn stop_below(&self, x: &Var, stop: f32) -> Result<Var> {
        let xv = x.value.clone();
        Ok(self.push(
            x.value.clone(),
            &[x],
            Box::new(move |g, _need| Ok(vec![Some(elementwise::grad_where_above(&xv, g, stop)?)])),
        ))
    }

    /// `clamp(x, lo, hi)` whose backward lets gradients through where they would pull `x`
    /// back into range (VQGAN+CLIP's `ClampWithGrad`), so that out-of-range pixels still
    /// receive a useful signal.
    pub fn clamp_with_grad(&self, x: &Var, lo: f32, hi: f32) -> Result<Var> {
        let y = elementwise::unary(&x.value, UnaryOp::Clamp { lo, hi })?;
        let xv = x.value.clone();
        Ok(self.push(
            y,
            &[x],
            Box::new(move |g, _need| {
                Ok(vec![Some(elementwise::clamp_with_grad_backward(
                    &xv, g, lo, hi,
                )?)])
            }),
        ))
    }

    /// Straight-through estimator (`replace_grad`): the value is `forward`, the gradient goes
    /// to `backward_to` unchanged, as if the op producing `forward` were the identity.
    pub fn straight_through(&self, forward: Tensor, backward_to: &Var) -> Result<Var> {
        if forward.shape() != backward_to.shape() {
            return Err(Error::shape(format!(
                "straight_through: value {:?} and target {:?} differ",
                forward.shape(),
                backward_to.shape()
            )));
        }
        Ok(self.push(
            forward,
            &[backward_to],
            Box::new(move |g, _need| Ok(vec![Some(g.clone())])),
        ))
    }

    /// Multi-head attention `softmax(scale · q kᵀ + mask) v` over `[B, H, T, D]` tensors
    /// (`k`, `v` may have another T), with an optional causal mask. Recorded as matmul →
    /// softmax → matmul so that its backward is theirs; the probabilities `[B, H, Tq, Tk]` are
    /// kept for the backward pass.
    pub fn attention(&self, q: &Var, k: &Var, v: &Var, causal: bool, scale: f32) -> Result<Var> {
        if !any_needs_grad(&[q, k, v], None) {
            // Inference: the fused online-softmax kernel, no probabilities kept.
            let o = crate::ops::attention::attention(&q.value, &k.value, &v.value, causal, scale)?;
            return Ok(self.leaf(o, false));
        }
        let scores = self.matmul(
            q,
            k,
            None,
            &MatmulOpts {
                trans_b: true,
                alpha: Some(scale),
                ..Default::default()
            },
        )?;
        let scores = if causal {
            let (tq, tk) = (q.value.dim(-2), k.value.dim(-2));
            let mut m = vec![0.0f32; tq * tk];
            for i in 0..tq {
                for j in (i + 1)..tk {
                    m[i * tk + j] = f32::NEG_INFINITY;
                }
            }
            let mask = self.leaf(Tensor::from_slice(q.value.gpu(), &m, &[tq, tk])?, false);
            self.add(&scores, &mask)?
        } else {
            scores
        };
        let p = self.softmax(&scores, 1.0)?;
        self.matmul(&p, v, None, &MatmulOpts::default())
    }

    /// [`Tape::attention`] on the `[B, T, H·D]` layout of q/k/v projections (`k`, `v` may
    /// have another T): returns `[B, Tq, H·D]`, the heads side by side as the output
    /// projection reads them. With no gradient needed this is one fused kernel reading the
    /// layout in place. With gradients it takes the path
    /// [`crate::ops::attention_backward::path`] picks for the device: the fused forward
    /// saving the log-sum-exp and the fused backward (in place, keeping only `o` and `L`),
    /// or the heads split out (`[B, T, H, D]` → `[B, H, T, D]`) around [`Tape::attention`].
    pub fn attention_bthd(
        &self,
        q: &Var,
        k: &Var,
        v: &Var,
        heads: usize,
        causal: bool,
        scale: f32,
    ) -> Result<Var> {
        let path = crate::ops::attention_backward::path(q.value.gpu());
        self.attention_bthd_path(q, k, v, heads, causal, scale, path)
    }

    /// [`Tape::attention_bthd`] with the gradient path given (the fused one only where
    /// [`crate::ops::attention_backward::fused_fits`] the head dim; else composed).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn attention_bthd_path(
        &self,
        q: &Var,
        k: &Var,
        v: &Var,
        heads: usize,
        causal: bool,
        scale: f32,
        path: crate::ops::attention_backward::Path,
    ) -> Result<Var> {
        use crate::ops::attention_backward::{
            attention_bthd_backward, attention_bthd_lse, fused_fits, Path,
        };
        if !any_needs_grad(&[q, k, v], None) {
            let o = crate::ops::attention::attention_bthd(
                &q.value, &k.value, &v.value, heads, causal, scale,
            )?;
            return Ok(self.leaf(o, false));
        }
        for (n, t) in [("q", q), ("k", k), ("v", v)] {
            if t.shape().len() != 3 || heads == 0 || t.shape()[2] % heads != 0 {
                return Err(Error::shape(format!(
                    "attention_bthd {n} must be [B, T, H*D] with {heads} heads, got {:?}",
                    t.shape()
                )));
            }
        }
        let (b, tq, hd) = (q.shape()[0], q.shape()[1], q.shape()[2]);
        let d = hd / heads;
        if path == Path::Fused && fused_fits(q.value.gpu(), d) {
            let (o, lse) = attention_bthd_lse(&q.value, &k.value, &v.value, heads, causal, scale)?;
            let (qv, kv, vv, ov) = (q.value.clone(), k.value.clone(), v.value.clone(), o.clone());
            return Ok(self.push(
                o,
                &[q, k, v],
                Box::new(move |g, need| {
                    let r = attention_bthd_backward(
                        &qv,
                        &kv,
                        &vv,
                        &ov,
                        &lse,
                        g,
                        heads,
                        causal,
                        scale,
                        [need[0], need[1], need[2]],
                    )?;
                    Ok(vec![r.dq, r.dk, r.dv])
                }),
            ));
        }
        // One head: [B, T, D] is already [B, 1, T, D] in memory.
        let split = |x: &Var| -> Result<Var> {
            let t = x.shape()[1];
            if heads == 1 {
                self.reshape(x, &[b, 1, t, d])
            } else {
                self.permute(&self.reshape(x, &[b, t, heads, d])?, &[0, 2, 1, 3])
            }
        };
        let o = self.attention(&split(q)?, &split(k)?, &split(v)?, causal, scale)?;
        if heads == 1 {
            self.reshape(&o, &[b, tq, hd])
        } else {
            self.reshape(&self.permute(&o, &[0, 2, 1, 3])?, &[b, tq, hd])
        }
    }

    /// Self-attention over the fused QKV projection's output `qkv` `[B, T, 3·H·D]` (rows
    /// `[q | k | v]`, heads side by side in each part): returns `[B, T, H·D]`, the same as
    /// [`Tape::attention_bthd`] on the three thirds. q, k and v are never copied out for
    /// the fused kernels: without gradients the forward reads them in place; with them, on
    /// the fused path, the backward writes dQ, dK and dV in place into one `[B, T, 3·H·D]`
    /// gradient, so that the projection's input gradient is one product. The composed path
    /// splits the heads out of `qkv` with three strided gathers (the permutes it needs
    /// anyway) and scatters their gradients back into one `[B, T, 3·H·D]` tensor.
    pub fn attention_qkv(&self, qkv: &Var, heads: usize, causal: bool, scale: f32) -> Result<Var> {
        let path = crate::ops::attention_backward::path(qkv.value.gpu());
        self.attention_qkv_path(qkv, heads, causal, scale, path)
    }

    /// [`Tape::attention_qkv`] with the gradient path given.
    pub(crate) fn attention_qkv_path(
        &self,
        qkv: &Var,
        heads: usize,
        causal: bool,
        scale: f32,
        path: crate::ops::attention_backward::Path,
    ) -> Result<Var> {
        use crate::ops::attention::{attention_qkv, qkv_dims};
        use crate::ops::attention_backward::{
            attention_qkv_backward, attention_qkv_lse, fused_fits, Path,
        };
        use crate::ops::permute::{gather_strided, scatter_strided};
        if !qkv.needs_grad {
            return Ok(self.leaf(attention_qkv(&qkv.value, heads, causal, scale)?, false));
        }
        let [b, h, t, _, d] = qkv_dims(&qkv.value, heads)?;
        let c = h * d;
        if path == Path::Fused && fused_fits(qkv.value.gpu(), d) {
            let (o, lse) = attention_qkv_lse(&qkv.value, heads, causal, scale)?;
            let (xv, ov) = (qkv.value.clone(), o.clone());
            return Ok(self.push(
                o,
                &[qkv],
                Box::new(move |g, _need| {
                    let dqkv = attention_qkv_backward(&xv, &ov, &lse, g, heads, causal, scale)?;
                    Ok(vec![Some(dqkv)])
                }),
            ));
        }
        // Composed: q, k, v [B, H, T, D] gathered out of the packed rows, the recorded
        // matmul → softmax → matmul on an inner tape, and its dQ, dK, dV scattered back.
        let (dims, strides) = ([b, h, t, d], [t * 3 * c, d, 3 * c, 1]);
        let inner = Tape::new();
        let parts = (0..3)
            .map(|s| Ok(inner.leaf(gather_strided(&qkv.value, &dims, &strides, s * c)?, true)))
            .collect::<Result<Vec<_>>>()?;
        let o = inner.attention(&parts[0], &parts[1], &parts[2], causal, scale)?;
        let o = inner.reshape(&inner.permute(&o, &[0, 2, 1, 3])?, &[b, t, c])?;
        let shape = qkv.shape().to_vec();
        Ok(self.push(
            o.value.clone(),
            &[qkv],
            Box::new(move |g, _need| {
                let mut grads = inner.backward_from(&o, g.clone())?;
                let dqkv = Tensor::empty(g.gpu(), &shape, crate::tensor::DType::F32)?;
                for (s, part) in parts.iter().enumerate() {
                    let dp = match grads.take(part) {
                        Some(dp) => dp,
                        None => Tensor::zeros(g.gpu(), &dims)?,
                    };
                    scatter_strided(&dp, &dqkv, &strides, s * c)?;
                }
                Ok(vec![Some(dqkv)])
            }),
        ))
    }

    /// `act(GroupNorm(x))` with affine `gamma`, `beta` `[C]`; `x`: `[N, C, ..]`.
    pub fn group_norm(
        &self,
        x: &Var,
        groups: usize,
        gamma: &Var,
        beta: &Var,
        eps: f32,
        act: Act,
    ) -> Result<Var> {
        use crate::ops::group_norm::{group_norm_act_backward_with, group_norm_saving};
        // The backward reads the forward's statistics (`stats`) instead of computing them
        // again; only an empty input has none, and its gradients are empty or zero.
        let backward = move |x: &Tensor,
                             stats: &Option<crate::ops::group_norm::GroupStats>,
                             gamma: &Tensor,
                             beta: Option<&Tensor>,
                             act: Act,
                             g: &Tensor,
                             params: bool| match stats {
            Some(st) => group_norm_act_backward_with(x, st, Some(gamma), beta, act, g, params),
            None => crate::ops::group_norm::group_norm_backward(x, groups, gamma, g, eps, params),
        };
        if !any_needs_grad(&[gamma, beta], None) {
            // Frozen γ, β: the activation stays fused. With no gradient at all that is the
            // inference kernel; otherwise (latent optimisation) the backward is one fused
            // pass family for dx.
            let (y, stats) = group_norm_saving(
                &x.value,
                groups,
                Some(&gamma.value),
                Some(&beta.value),
                eps,
                act,
            )?;
            if !any_needs_grad(&[x], None) {
                return Ok(self.leaf(y, false));
            }
            let (xv, gv, bv) = (x.value.clone(), gamma.value.clone(), beta.value.clone());
            return Ok(self.push(
                y,
                &[x, gamma, beta],
                Box::new(move |g, _need| {
                    let (dx, ..) = backward(&xv, &stats, &gv, Some(&bv), act, g, false)?;
                    Ok(vec![Some(dx), None, None])
                }),
            ));
        }
        let (y, stats) = group_norm_saving(
            &x.value,
            groups,
            Some(&gamma.value),
            Some(&beta.value),
            eps,
            Act::None,
        )?;
        let (xv, gv) = (x.value.clone(), gamma.value.clone());
        let out = self.push(
            y,
            &[x, gamma, beta],
            Box::new(move |g, need| {
                let r = backward(&xv, &stats, &gv, None, Act::None, g, need[1] || need[2])?;
                Ok(vec![
                    need[0].then_some(r.0),
                    r.1.filter(|_| need[1]),
                    r.2.filter(|_| need[2]),
                ])
            }),
        );
        if act == Act::None {
            Ok(out)
        } else {
            self.act(&out, act)
        }
    }

    /// `len` entries of `x` along `axis` from `start`.
    pub fn slice(&self, x: &Var, axis: usize, start: usize, len: usize) -> Result<Var> {
        use crate::ops::concat::{slice, slice_backward};
        let y = slice(&x.value, axis, start, len)?;
        let shape = x.shape().to_vec();
        Ok(self.push(
            y,
            &[x],
            Box::new(move |g, _need| Ok(vec![Some(slice_backward(g, &shape, axis, start, len)?)])),
        ))
    }

    /// Gradient checkpointing: runs `f` on `inputs` without keeping its activations, and
    /// runs it again during the backward pass to get the inputs' gradients (one more forward
    /// of the block, in exchange for holding only the block's inputs between the passes).
    /// `f` must be deterministic and may only read frozen parameters (through the inner
    /// tape's [`Tape::param`]): checkpointing is refused on a [`Tape::training`] tape, whose
    /// parameter gradients would be lost inside the block.
    pub fn checkpoint(
        &self,
        inputs: &[&Var],
        f: impl Fn(&Tape, &[Var]) -> Result<Var> + 'static,
    ) -> Result<Var> {
        if self.training {
            return Err(Error::invalid(
                "checkpointing keeps no parameter gradients; it cannot run on a training tape",
            ));
        }
        let values: Vec<Tensor> = inputs.iter().map(|v| v.value.clone()).collect();
        let y = {
            let inner = Tape::new();
            let leaves: Vec<Var> = values
                .iter()
                .map(|v| inner.leaf(v.clone(), false))
                .collect();
            f(&inner, &leaves)?.value
        };
        Ok(self.push(
            y,
            inputs,
            Box::new(move |g, need| {
                let inner = Tape::new();
                let leaves: Vec<Var> = values
                    .iter()
                    .zip(need)
                    .map(|(v, &n)| inner.leaf(v.clone(), n))
                    .collect();
                let y = f(&inner, &leaves)?;
                let weight = inner.leaf(g.clone(), false);
                let loss = inner.sum(&inner.mul(&y, &weight)?)?;
                let mut grads = inner.backward(&loss)?;
                Ok(leaves.iter().map(|l| grads.take(l)).collect())
            }),
        ))
    }

    /// Rows of `table` `[V, D]` at `ids` (u32, any shape): `ids.shape() + [D]` (embedding
    /// lookup, VQ codebook gather). Backward sums each row's gradients into the table
    /// (deterministically); `ids` get none.
    pub fn gather_rows(&self, table: &Var, ids: &Tensor) -> Result<Var> {
        if table.shape().len() != 2 {
            return Err(crate::Error::shape(format!(
                "gather_rows table must be [V, D], got {:?}",
                table.shape()
            )));
        }
        let y = crate::ops::gather::gather_rows(table.value(), ids)?;
        let vocab = table.shape()[0];
        let ids = ids.clone();
        Ok(self.push(
            y,
            &[table],
            Box::new(move |g, _need| {
                Ok(vec![Some(crate::ops::gather::scatter_add_rows(
                    g, &ids, vocab,
                )?)])
            }),
        ))
    }

    /// `xs` joined along `axis`.
    pub fn concat(&self, xs: &[&Var], axis: usize) -> Result<Var> {
        use crate::ops::concat::{concat, concat_backward};
        let vals: Vec<&Tensor> = xs.iter().map(|v| &v.value).collect();
        let y = concat(&vals, axis)?;
        let sizes: Vec<usize> = xs.iter().map(|v| v.shape()[axis]).collect();
        Ok(self.push(
            y,
            xs,
            Box::new(move |g, need| concat_backward(g, &sizes, axis, need)),
        ))
    }

    /// Runs the backward pass from the scalar `loss` (`[1]` or `[]`), seeding `dloss = 1`.
    pub fn backward(&self, loss: &Var) -> Result<Grads> {
        if loss.value.numel() != 1 {
            return Err(Error::shape(format!(
                "backward needs a scalar loss, got shape {:?}",
                loss.shape()
            )));
        }
        self.backward_from(loss, Tensor::full(loss.value.gpu(), loss.shape(), 1.0)?)
    }

    /// The backward pass from `y` with its gradient `g` given (`y`'s shape): what an op
    /// recorded on an inner tape runs from its own backward rule.
    pub(crate) fn backward_from(&self, y: &Var, g: Tensor) -> Result<Grads> {
        if g.shape() != y.shape() {
            return Err(Error::shape(format!(
                "backward from {:?} seeded with a gradient {:?}",
                y.shape(),
                g.shape()
            )));
        }
        let loss = y;
        let mut grads: HashMap<usize, Tensor> = HashMap::new();
        grads.insert(loss.id, g);
        let mut leaves = HashMap::new();
        let mut nodes = self.nodes.borrow_mut();
        for id in (0..=loss.id).rev() {
            let Some(g) = grads.remove(&id) else { continue };
            let Some(bw) = nodes[id].backward.take() else {
                // A leaf (or a node nothing upstream needs): keep its gradient.
                leaves.insert(id, g);
                continue;
            };
            let parents = nodes[id].parents.clone();
            let need: Vec<bool> = parents.iter().map(|&p| nodes[p].needs_grad).collect();
            let parent_grads = bw(&g, &need)?;
            for (p, pg) in parents.into_iter().zip(parent_grads) {
                let Some(pg) = pg else { continue };
                if !nodes[p].needs_grad {
                    continue;
                }
                let acc = match grads.remove(&p) {
                    Some(prev) => elementwise::add(&prev, &pg)?,
                    None => pg,
                };
                grads.insert(p, acc);
            }
        }
        Ok(Grads(leaves))
    }
}

mod conv;
mod loss;

#[cfg(test)]
mod tests;
