//! Tape ops for contrastive training: `exp`, multiplication by a learned scalar, and
//! softmax cross-entropy against integer targets. Wiring only: the backward rules live in
//! [`crate::ops::elementwise`] and [`crate::ops::loss`].

use super::{Tape, Var};
use crate::ops::elementwise::{self, UnaryOp};
use crate::{Error, Result};

impl Tape {
    /// `eˣ` elementwise.
    pub fn exp(&self, x: &Var) -> Result<Var> {
        let y = elementwise::unary(&x.value, UnaryOp::Exp)?;
        let yv = y.clone();
        Ok(self.push(
            y,
            &[x],
            Box::new(move |g, _need| Ok(vec![Some(elementwise::exp_backward(&yv, g)?)])),
        ))
    }

    /// `x · s` with `s` a single value (`[1]`) that may need a gradient (a learned
    /// temperature): `ds = Σ g·x`.
    pub fn mul_scalar(&self, x: &Var, s: &Var) -> Result<Var> {
        if s.value.numel() != 1 {
            return Err(Error::shape(format!(
                "mul_scalar: the scalar must have one element, got shape {:?}",
                s.shape()
            )));
        }
        let y = elementwise::mul(&x.value, &s.value.reshape(&[1])?)?;
        let (xv, sv) = (x.value.clone(), s.value.clone());
        Ok(self.push(
            y,
            &[x, s],
            Box::new(move |g, need| {
                let (dx, ds) = elementwise::mul_scalar_backward(&xv, &sv, g, [need[0], need[1]])?;
                Ok(vec![dx, ds])
            }),
        ))
    }

    /// Mean softmax cross-entropy of `logits` `[N, C]` against class `targets[i] < C` of
    /// each row, as a `[1]` tensor ([`crate::ops::loss::cross_entropy`]; backward:
    /// [`crate::ops::loss::cross_entropy_backward`]).
    pub fn cross_entropy(&self, logits: &Var, targets: &[u32]) -> Result<Var> {
        use crate::ops::loss::{cross_entropy, cross_entropy_backward};
        let (loss, onehot) = cross_entropy(&logits.value, targets)?;
        let xv = logits.value.clone();
        Ok(self.push(
            loss,
            &[logits],
            Box::new(move |g, _need| Ok(vec![Some(cross_entropy_backward(&xv, &onehot, g)?)])),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{check, fd};
    use super::*;
    use crate::ops::testutil::{gpu, rand_vec};
    use crate::Tensor;

    #[test]
    fn exp_and_mul_scalar_gradients() {
        let g = gpu();
        let xs = rand_vec(3 * 5, 1);
        let s0 = [0.7f32];
        let w = rand_vec(15, 2);
        let tape = Tape::new();
        let x = tape.leaf(Tensor::from_slice(&g, &xs, &[3, 5]).unwrap(), true);
        let s = tape.leaf(Tensor::from_slice(&g, &s0, &[1]).unwrap(), true);
        let wv = tape.leaf(Tensor::from_slice(&g, &w, &[3, 5]).unwrap(), false);
        // L = Σ w · (x · e^s)
        let y = tape.mul_scalar(&x, &tape.exp(&s).unwrap()).unwrap();
        let loss = tape.sum(&tape.mul(&y, &wv).unwrap()).unwrap();
        let grads = tape.backward(&loss).unwrap();
        let f = |xx: &[f64], ss: f64| -> f64 {
            xx.iter()
                .zip(&w)
                .map(|(a, b)| a * ss.exp() * *b as f64)
                .sum()
        };
        let want_x = fd(&|v| f(v, s0[0] as f64), &xs);
        let x64: Vec<f64> = xs.iter().map(|&v| v as f64).collect();
        let want_s = fd(&|v| f(&x64, v[0]), &s0);
        check(grads.get(&x).unwrap(), &want_x, "d/dx");
        check(grads.get(&s).unwrap(), &want_s, "d/ds");
    }

    fn cpu_ce(x: &[f64], t: &[u32], c: usize) -> f64 {
        let n = t.len();
        let mut total = 0.0;
        for i in 0..n {
            let row = &x[i * c..(i + 1) * c];
            let m = row.iter().cloned().fold(f64::MIN, f64::max);
            let lse = m + row.iter().map(|v| (v - m).exp()).sum::<f64>().ln();
            total += lse - row[t[i] as usize];
        }
        total / n as f64
    }

    #[test]
    fn cross_entropy_value_and_gradient() {
        let g = gpu();
        for (n, c, scale) in [(1, 1, 1.0), (4, 4, 3.0), (3, 17, 1.0), (65, 9, 20.0)] {
            let xs: Vec<f32> = rand_vec(n * c, n as u64 + 7)
                .iter()
                .map(|v| v * scale)
                .collect();
            let t: Vec<u32> = (0..n).map(|i| ((i * 7 + 3) % c) as u32).collect();
            let tape = Tape::new();
            let x = tape.leaf(Tensor::from_slice(&g, &xs, &[n, c]).unwrap(), true);
            // Scaled by 3 so that the upstream gradient is not 1.
            let loss = tape
                .affine(&tape.cross_entropy(&x, &t).unwrap(), 3.0, 0.0)
                .unwrap();
            let x64: Vec<f64> = xs.iter().map(|&v| v as f64).collect();
            let want = 3.0 * cpu_ce(&x64, &t, c);
            let got = loss.value().to_vec().unwrap()[0] as f64;
            assert!(
                (got - want).abs() <= 1e-5 * (1.0 + want.abs()),
                "{n}x{c}: loss {got} vs {want}"
            );
            let grads = tape.backward(&loss).unwrap();
            let fdv = fd(&|v| 3.0 * cpu_ce(v, &t, c), &xs);
            check(grads.get(&x).unwrap(), &fdv, &format!("ce {n}x{c}"));
        }
        // Large logits stay finite (the row maximum is subtracted).
        let tape = Tape::new();
        let x = tape.leaf(
            Tensor::from_slice(&g, &[200.0, -200.0, 0.0, 100.0], &[2, 2]).unwrap(),
            true,
        );
        let l = tape.cross_entropy(&x, &[1, 0]).unwrap();
        let v = l.value().to_vec().unwrap()[0];
        assert!((v - 250.0).abs() < 1e-3, "{v}");
        assert!(tape.cross_entropy(&x, &[2, 0]).is_err());
        assert!(tape.cross_entropy(&x, &[0]).is_err());
    }
}
