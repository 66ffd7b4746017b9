//! Gradient checks: GPU backward rules against central finite differences of an f64 CPU
//! evaluation of the same function.

use super::*;
use crate::ops::group_norm::group_norm_backward;
use crate::ops::testutil::{gpu, rand_vec};

/// Central differences of `f` at `x` (f64, h = 1e-5): truncation error O(h²·f''') ≈ 1e-10.
pub(crate) fn fd(f: &dyn Fn(&[f64]) -> f64, x: &[f32]) -> Vec<f64> {
    let mut xv: Vec<f64> = x.iter().map(|&v| v as f64).collect();
    let h = 1e-5;
    (0..xv.len())
        .map(|i| {
            let x0 = xv[i];
            xv[i] = x0 + h;
            let up = f(&xv);
            xv[i] = x0 - h;
            let down = f(&xv);
            xv[i] = x0;
            (up - down) / (2.0 * h)
        })
        .collect()
}

/// f32 forward + backward against f64 differences: |g − fd| ≤ 1e-4 + 1e-3·|fd| covers f32
/// rounding of sums of a few dozen terms and the 1.5e-7 erf approximation.
pub(crate) fn check(got: &Tensor, want: &[f64], what: &str) {
    let got = got.to_vec().unwrap();
    assert_eq!(got.len(), want.len(), "{what}");
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let tol = 1e-4 + 1e-3 * w.abs();
        assert!(
            ((g as f64) - w).abs() <= tol,
            "{what}[{i}]: backward {g} vs finite difference {w}"
        );
    }
}

/// A loss as a function of a norm's input, scale and shift, in f64.
type NormLoss<'a> = &'a dyn Fn(&[f64], &[f64], &[f64]) -> f64;

/// dx, dγ and dβ of an affine norm against central differences of `f(x, γ, β)`, each
/// argument perturbed with the other two held at their values.
fn check_norm_grads(
    grads: &Grads,
    (x, gamma, beta): (&Var, &Var, &Var),
    (xv, gam, bet): (&[f32], &[f32], &[f32]),
    f: NormLoss<'_>,
) {
    let d64 = |v: &[f32]| v.iter().map(|&q| q as f64).collect::<Vec<_>>();
    let (x64, g64, b64) = (d64(xv), d64(gam), d64(bet));
    check(grads.get(x).unwrap(), &fd(&|p| f(p, &g64, &b64), xv), "dx");
    check(
        grads.get(gamma).unwrap(),
        &fd(&|p| f(&x64, p, &b64), gam),
        "dgamma",
    );
    check(
        grads.get(beta).unwrap(),
        &fd(&|p| f(&x64, &g64, p), bet),
        "dbeta",
    );
}

#[test]
fn linear_act_square_sum_gradients() {
    let g = gpu();
    let (batch, m, k, n) = (2, 3, 5, 4);
    for act in [
        Act::None,
        Act::Gelu,
        Act::QuickGelu,
        Act::Silu,
        Act::Sigmoid,
        Act::GeluTanh,
    ] {
        let xv = rand_vec(batch * m * k, 1);
        let wv = rand_vec(n * k, 2);
        let bv = rand_vec(n, 3);
        let tape = Tape::new();
        let x = tape.leaf(Tensor::from_slice(&g, &xv, &[batch, m, k]).unwrap(), true);
        let w = tape.leaf(Tensor::from_slice(&g, &wv, &[n, k]).unwrap(), true);
        let b = tape.leaf(Tensor::from_slice(&g, &bv, &[n]).unwrap(), true);
        let y = tape
            .matmul(
                &x,
                &w,
                Some(&b),
                &MatmulOpts {
                    trans_b: true,
                    act,
                    alpha: Some(0.7),
                    ..Default::default()
                },
            )
            .unwrap();
        let loss = tape.sum(&tape.square(&y).unwrap()).unwrap();
        let grads = tape.backward(&loss).unwrap();
        let f = |xs: &[f64], ws: &[f64], bs: &[f64]| -> f64 {
            crate::ops::matmul::reference(
                xs,
                ws,
                batch,
                m,
                n,
                k,
                false,
                true,
                true,
                0.7,
                Some(bs),
                Act::None,
                None,
            )
            .0
            .iter()
            .map(|&p| act.reference(p).powi(2))
            .sum()
        };
        let d64 = |v: &[f32]| v.iter().map(|&x| x as f64).collect::<Vec<_>>();
        let (x64, w64, b64) = (d64(&xv), d64(&wv), d64(&bv));
        check(
            grads.get(&x).unwrap(),
            &fd(&|p| f(p, &w64, &b64), &xv),
            &format!("{act:?} dx"),
        );
        check(
            grads.get(&w).unwrap(),
            &fd(&|p| f(&x64, p, &b64), &wv),
            &format!("{act:?} dW"),
        );
        check(
            grads.get(&b).unwrap(),
            &fd(&|p| f(&x64, &w64, p), &bv),
            &format!("{act:?} db"),
        );
    }
}

#[test]
fn matmul_gradients_for_every_transpose_and_batching() {
    let g = gpu();
    let (batch, m, k, n) = (3, 4, 3, 5);
    for (ta, tb, shared) in [
        (false, false, false),
        (false, true, false),
        (true, false, false),
        (true, true, false),
        (false, false, true),
        (false, true, true),
    ] {
        let av = rand_vec(batch * m * k, 10);
        let bv = rand_vec(if shared { k * n } else { batch * k * n }, 11);
        let wv = rand_vec(batch * m * n, 12); // weights of a linear loss Σ w·y
        let a_shape = if ta {
            vec![batch, k, m]
        } else {
            vec![batch, m, k]
        };
        let mut b_shape = if tb { vec![n, k] } else { vec![k, n] };
        if !shared {
            b_shape.insert(0, batch);
        }
        let tape = Tape::new();
        let a = tape.leaf(Tensor::from_slice(&g, &av, &a_shape).unwrap(), true);
        let b = tape.leaf(Tensor::from_slice(&g, &bv, &b_shape).unwrap(), true);
        let w = tape.leaf(Tensor::from_slice(&g, &wv, &[batch, m, n]).unwrap(), false);
        let y = tape
            .matmul(
                &a,
                &b,
                None,
                &MatmulOpts {
                    trans_a: ta,
                    trans_b: tb,
                    alpha: Some(1.5),
                    ..Default::default()
                },
            )
            .unwrap();
        let loss = tape.sum(&tape.mul(&y, &w).unwrap()).unwrap();
        let grads = tape.backward(&loss).unwrap();
        assert!(
            grads.get(&w).is_none(),
            "no gradient for a leaf that does not need one"
        );
        let w64: Vec<f64> = wv.iter().map(|&v| v as f64).collect();
        let f = |as_: &[f64], bs: &[f64]| -> f64 {
            crate::ops::matmul::reference(
                as_,
                bs,
                batch,
                m,
                n,
                k,
                ta,
                tb,
                shared,
                1.5,
                None,
                Act::None,
                None,
            )
            .0
            .iter()
            .zip(&w64)
            .map(|(y, w)| y * w)
            .sum()
        };
        let a64: Vec<f64> = av.iter().map(|&v| v as f64).collect();
        let b64: Vec<f64> = bv.iter().map(|&v| v as f64).collect();
        let what = format!("ta{ta} tb{tb} shared{shared}");
        check(
            grads.get(&a).unwrap(),
            &fd(&|p| f(p, &b64), &av),
            &format!("{what} dA"),
        );
        check(
            grads.get(&b).unwrap(),
            &fd(&|p| f(&a64, p), &bv),
            &format!("{what} dB"),
        );
    }
}

#[test]
fn elementwise_gradients_with_broadcast_and_reuse() {
    // loss = mean((a·c − b)² ) + Σ affine(a) where c: [N] broadcasts over a: [R, N] and a is
    // used twice (gradients accumulate).
    let g = gpu();
    let (r, n) = (3, 7);
    let av = rand_vec(r * n, 20);
    let bv = rand_vec(r * n, 21);
    let cv = rand_vec(n, 22);
    let tape = Tape::new();
    let a = tape.leaf(Tensor::from_slice(&g, &av, &[r, n]).unwrap(), true);
    let b = tape.leaf(Tensor::from_slice(&g, &bv, &[r, n]).unwrap(), true);
    let c = tape.leaf(Tensor::from_slice(&g, &cv, &[n]).unwrap(), true);
    let d = tape.sub(&tape.mul(&a, &c).unwrap(), &b).unwrap();
    let l1 = tape.mean(&tape.square(&d).unwrap()).unwrap();
    let l2 = tape.sum(&tape.affine(&a, -0.3, 2.0).unwrap()).unwrap();
    let loss = tape.add(&l1, &l2).unwrap();
    let grads = tape.backward(&loss).unwrap();
    let f = |a: &[f64], b: &[f64], c: &[f64]| -> f64 {
        let mut s = 0.0;
        let mut t = 0.0;
        for i in 0..r * n {
            s += (a[i] * c[i % n] - b[i]).powi(2);
            t += -0.3 * a[i] + 2.0;
        }
        s / (r * n) as f64 + t
    };
    let d64 = |v: &[f32]| v.iter().map(|&x| x as f64).collect::<Vec<_>>();
    let (a64, b64, c64) = (d64(&av), d64(&bv), d64(&cv));
    check(
        grads.get(&a).unwrap(),
        &fd(&|p| f(p, &b64, &c64), &av),
        "da",
    );
    check(
        grads.get(&b).unwrap(),
        &fd(&|p| f(&a64, p, &c64), &bv),
        "db",
    );
    check(
        grads.get(&c).unwrap(),
        &fd(&|p| f(&a64, &b64, p), &cv),
        "dc",
    );
}

#[test]
fn backward_needs_a_scalar() {
    let g = gpu();
    let tape = Tape::new();
    let x = tape.leaf(Tensor::zeros(&g, &[2, 2]).unwrap(), true);
    let y = tape.square(&x).unwrap();
    assert!(tape
        .backward(&y)
        .unwrap_err()
        .to_string()
        .contains("scalar"));
}

#[test]
fn act_backward_matches_analytic_derivative() {
    let g = gpu();
    let xv: Vec<f32> = rand_vec(513, 30).iter().map(|v| v * 5.0).collect();
    let gv = rand_vec(513, 31);
    let x = Tensor::from_slice(&g, &xv, &[513]).unwrap();
    let gt = Tensor::from_slice(&g, &gv, &[513]).unwrap();
    for act in Act::ALL {
        let got = elementwise::act_backward(&x, &gt, act)
            .unwrap()
            .to_vec()
            .unwrap();
        for i in 0..513 {
            let want = gv[i] as f64 * act.grad_reference(xv[i] as f64);
            assert!(
                (got[i] as f64 - want).abs() <= 2e-6 * (1.0 + want.abs()),
                "{act:?} at x={}: {} vs {want}",
                xv[i],
                got[i]
            );
        }
    }
}

#[test]
fn layer_norm_softmax_permute_gradients() {
    // loss = Σ w ⊙ softmax(1.3 · permute(layer_norm(x)))  with x: [2, 3, 5]
    let g = gpu();
    let (a, b, c) = (2, 3, 5);
    let xv: Vec<f32> = rand_vec(a * b * c, 40).iter().map(|v| v * 2.0).collect();
    let gam: Vec<f32> = rand_vec(c, 41).iter().map(|v| v + 1.0).collect();
    let bet = rand_vec(c, 42);
    let wv = rand_vec(a * b * c, 43);
    let tape = Tape::new();
    let x = tape.leaf(Tensor::from_slice(&g, &xv, &[a, b, c]).unwrap(), true);
    let gamma = tape.leaf(Tensor::from_slice(&g, &gam, &[c]).unwrap(), true);
    let beta = tape.leaf(Tensor::from_slice(&g, &bet, &[c]).unwrap(), true);
    let w = tape.leaf(Tensor::from_slice(&g, &wv, &[a, c, b]).unwrap(), false);
    let ln = tape.layer_norm(&x, &gamma, &beta, 1e-5).unwrap();
    let pm = tape.permute(&ln, &[0, 2, 1]).unwrap();
    let sm = tape.softmax(&pm, 1.3).unwrap();
    let loss = tape.sum(&tape.mul(&sm, &w).unwrap()).unwrap();
    let grads = tape.backward(&loss).unwrap();
    let f = |xs: &[f64], gs: &[f64], bs: &[f64]| -> f64 {
        let ln = crate::ops::layer_norm::reference(xs, c, Some(gs), Some(bs), 1e-5);
        let pm = crate::ops::permute::reference(&ln, &[a, b, c], &[0, 2, 1]);
        let sm = crate::ops::softmax::reference(&pm, b, 1.3);
        sm.iter().zip(&wv).map(|(y, &w)| y * w as f64).sum()
    };
    check_norm_grads(&grads, (&x, &gamma, &beta), (&xv, &gam, &bet), &f);
}

#[test]
fn spherical_distance_and_stop_gradients() {
    // loss = mean(stop_below(spherical(a, b), 0.3))  with a: [4, 6], b: [2, 6]
    let g = gpu();
    let (n, k, d) = (4, 2, 6);
    let av = rand_vec(n * d, 50);
    let bv = rand_vec(k * d, 51);
    let tape = Tape::new();
    let a = tape.leaf(Tensor::from_slice(&g, &av, &[n, d]).unwrap(), true);
    let b = tape.leaf(Tensor::from_slice(&g, &bv, &[k, d]).unwrap(), true);
    let dist = tape.spherical_distance(&a, &b).unwrap();
    let stopped = tape.stop_below(&dist, 0.3).unwrap();
    let loss = tape.mean(&stopped).unwrap();
    let grads = tape.backward(&loss).unwrap();
    // The reference formula of the VQGAN+CLIP notebooks: 2·asin(‖â − b̂‖/2)².
    let dists = |a: &[f64], b: &[f64]| -> Vec<f64> {
        let unit = |v: &[f64]| {
            let nrm = v.iter().map(|q| q * q).sum::<f64>().sqrt();
            v.iter().map(|q| q / nrm).collect::<Vec<_>>()
        };
        let mut out = vec![];
        for i in 0..n {
            for j in 0..k {
                let (x, y) = (unit(&a[i * d..(i + 1) * d]), unit(&b[j * d..(j + 1) * d]));
                let dd = x
                    .iter()
                    .zip(&y)
                    .map(|(p, q)| (p - q).powi(2))
                    .sum::<f64>()
                    .sqrt();
                out.push(2.0 * (dd / 2.0).asin().powi(2));
            }
        }
        out
    };
    let d64 = |v: &[f32]| v.iter().map(|&q| q as f64).collect::<Vec<_>>();
    let (a64, b64) = (d64(&av), d64(&bv));
    let base = dists(&a64, &b64);
    let got = dist.value().to_vec().unwrap();
    for i in 0..got.len() {
        assert!(
            (got[i] as f64 - base[i]).abs() < 1e-5,
            "distance {i}: {} vs {}",
            got[i],
            base[i]
        );
    }
    // The stop mask is fixed by the unperturbed distances (finite differences must not cross it).
    let mask: Vec<f64> = base
        .iter()
        .map(|&v| if v > 0.3 { 1.0 } else { 0.0 })
        .collect();
    assert!(mask.contains(&0.0) || base.iter().all(|&v| v > 0.3));
    let f = |a: &[f64], b: &[f64]| -> f64 {
        dists(a, b)
            .iter()
            .zip(&mask)
            .map(|(v, m)| v * m)
            .sum::<f64>()
            / (n * k) as f64
    };
    check(grads.get(&a).unwrap(), &fd(&|p| f(p, &b64), &av), "da");
    check(grads.get(&b).unwrap(), &fd(&|p| f(&a64, p), &bv), "db");
}

#[test]
fn clamp_with_grad_and_straight_through() {
    let g = gpu();
    let xv = [-0.5f32, 0.2, 0.9, 1.4, 1.6, -0.1];
    let wv = [1.0f32, -1.0, 2.0, 1.0, -1.0, -3.0];
    let tape = Tape::new();
    let x = tape.leaf(Tensor::from_slice(&g, &xv, &[6]).unwrap(), true);
    let w = tape.leaf(Tensor::from_slice(&g, &wv, &[6]).unwrap(), false);
    let c = tape.clamp_with_grad(&x, 0.0, 1.0).unwrap();
    assert_eq!(
        c.value().to_vec().unwrap(),
        vec![0.0, 0.2, 0.9, 1.0, 1.0, 0.0]
    );
    // loss = Σ w·clamp(x): dL/dclamp = w. Inside the range w passes. Outside, it passes only
    // when −w moves x toward the range: x=-0.5 (below), w=1 → step −1 moves further down →
    // blocked; x=1.4 (above), w=1 → step −1 moves down into range → passes; x=1.6, w=-1 →
    // blocked; x=-0.1, w=-3 → step +3 moves up → passes.
    let loss = tape.sum(&tape.mul(&c, &w).unwrap()).unwrap();
    let grads = tape.backward(&loss).unwrap();
    assert_eq!(
        grads.get(&x).unwrap().to_vec().unwrap(),
        vec![0.0, -1.0, 2.0, 1.0, 0.0, -3.0]
    );

    let tape = Tape::new();
    let z = tape.leaf(Tensor::from_slice(&g, &[0.3, -0.7], &[2]).unwrap(), true);
    let q = Tensor::from_slice(&g, &[1.0, -1.0], &[2]).unwrap();
    let st = tape.straight_through(q, &z).unwrap();
    assert_eq!(st.value().to_vec().unwrap(), vec![1.0, -1.0]);
    let loss = tape.sum(&tape.square(&st).unwrap()).unwrap();
    let grads = tape.backward(&loss).unwrap();
    // d(Σ q²)/dq = 2q, passed straight to z.
    assert_eq!(grads.get(&z).unwrap().to_vec().unwrap(), vec![2.0, -2.0]);
}

#[test]
fn attention_gradients_with_and_without_causal_mask() {
    let g = gpu();
    let (b, h, t, d) = (1, 2, 4, 3);
    for causal in [false, true] {
        let qv = rand_vec(b * h * t * d, 60);
        let kv = rand_vec(b * h * t * d, 61);
        let vv = rand_vec(b * h * t * d, 62);
        let wv = rand_vec(b * h * t * d, 63);
        let tape = Tape::new();
        let sh = [b, h, t, d];
        let q = tape.leaf(Tensor::from_slice(&g, &qv, &sh).unwrap(), true);
        let k = tape.leaf(Tensor::from_slice(&g, &kv, &sh).unwrap(), true);
        let v = tape.leaf(Tensor::from_slice(&g, &vv, &sh).unwrap(), true);
        let w = tape.leaf(Tensor::from_slice(&g, &wv, &sh).unwrap(), false);
        let o = tape.attention(&q, &k, &v, causal, 0.7).unwrap();
        let loss = tape.sum(&tape.mul(&o, &w).unwrap()).unwrap();
        let grads = tape.backward(&loss).unwrap();
        let f = |q: &[f64], k: &[f64], v: &[f64]| -> f64 {
            let o = crate::ops::attention::reference(q, k, v, b * h, t, t, d, causal, 0.7);
            o.iter().zip(&wv).map(|(o, &w)| o * w as f64).sum()
        };
        let d64 = |x: &[f32]| x.iter().map(|&q| q as f64).collect::<Vec<_>>();
        let (q64, k64, v64) = (d64(&qv), d64(&kv), d64(&vv));
        check(
            grads.get(&q).unwrap(),
            &fd(&|p| f(p, &k64, &v64), &qv),
            &format!("causal {causal} dq"),
        );
        check(
            grads.get(&k).unwrap(),
            &fd(&|p| f(&q64, p, &v64), &kv),
            &format!("causal {causal} dk"),
        );
        check(
            grads.get(&v).unwrap(),
            &fd(&|p| f(&q64, &k64, p), &vv),
            &format!("causal {causal} dv"),
        );
    }
}

#[test]
fn inference_paths_match_the_recorded_ones() {
    // Without gradients the tape takes the fused kernels; values must agree with the
    // recorded (composed) path.
    let g = gpu();
    let sh = [2, 3, 5, 4];
    let (qv, kv, vv) = (rand_vec(120, 70), rand_vec(120, 71), rand_vec(120, 72));
    let wv = rand_vec(6 * 4, 73);
    let bv = rand_vec(6, 74);
    for needs in [false, true] {
        let tape = Tape::new();
        let t = |v: &[f32], s: &[usize]| tape.leaf(Tensor::from_slice(&g, v, s).unwrap(), needs);
        let (q, k, v) = (t(&qv, &sh), t(&kv, &sh), t(&vv, &sh));
        let o = tape
            .attention(&q, &k, &v, true, 0.5)
            .unwrap()
            .value()
            .to_vec()
            .unwrap();
        let lin = tape
            .linear(&q, &t(&wv, &[6, 4]), Some(&t(&bv, &[6])), Act::QuickGelu)
            .unwrap()
            .value()
            .to_vec()
            .unwrap();
        let want_o = crate::ops::attention::reference(&qv, &kv, &vv, 6, 5, 5, 4, true, 0.5);
        for i in 0..o.len() {
            assert!(
                (o[i] as f64 - want_o[i]).abs() < 1e-5,
                "attention needs={needs} [{i}]"
            );
        }
        for r in 0..30 {
            for j in 0..6 {
                let pre: f64 = (0..4)
                    .map(|c| qv[r * 4 + c] as f64 * wv[j * 4 + c] as f64)
                    .sum::<f64>()
                    + bv[j] as f64;
                let want = Act::QuickGelu.reference(pre);
                assert!(
                    (lin[r * 6 + j] as f64 - want).abs() < 1e-5,
                    "linear needs={needs}"
                );
            }
        }
    }
}

#[test]
fn group_norm_gradients() {
    // loss = Σ w ⊙ swish(GroupNorm(x))  with x: [2, 4, 3, 2], 2 groups
    let g = gpu();
    let (n, c, h, w, groups) = (2, 4, 3, 2, 2);
    let len = n * c * h * w;
    let xv: Vec<f32> = rand_vec(len, 80).iter().map(|v| v * 2.0 + 0.3).collect();
    let gam: Vec<f32> = rand_vec(c, 81).iter().map(|v| v + 1.0).collect();
    let bet = rand_vec(c, 82);
    let wv = rand_vec(len, 83);
    let tape = Tape::new();
    let x = tape.leaf(Tensor::from_slice(&g, &xv, &[n, c, h, w]).unwrap(), true);
    let gamma = tape.leaf(Tensor::from_slice(&g, &gam, &[c]).unwrap(), true);
    let beta = tape.leaf(Tensor::from_slice(&g, &bet, &[c]).unwrap(), true);
    let wt = tape.leaf(Tensor::from_slice(&g, &wv, &[n, c, h, w]).unwrap(), false);
    let y = tape
        .group_norm(&x, groups, &gamma, &beta, 1e-6, Act::Silu)
        .unwrap();
    let loss = tape.sum(&tape.mul(&y, &wt).unwrap()).unwrap();
    let grads = tape.backward(&loss).unwrap();
    let f = |xs: &[f64], gs: &[f64], bs: &[f64]| -> f64 {
        let y = crate::ops::group_norm::reference(
            xs,
            n,
            c,
            h * w,
            groups,
            Some(gs),
            Some(bs),
            1e-6,
            Act::Silu,
        );
        y.iter().zip(&wv).map(|(y, &w)| y * w as f64).sum()
    };
    check_norm_grads(&grads, (&x, &gamma, &beta), (&xv, &gam, &bet), &f);
}

#[test]
fn group_norm_gradient_of_x_alone_skips_the_parameter_sums() {
    // The latent-optimisation path (γ, β need no gradient) gives the same dx and no sums.
    let g = gpu();
    let (n, c, h, w, groups) = (2, 4, 3, 2, 2);
    let len = n * c * h * w;
    let x = Tensor::from_slice(&g, &rand_vec(len, 84), &[n, c, h, w]).unwrap();
    let gamma = Tensor::from_slice(&g, &rand_vec(c, 85), &[c]).unwrap();
    let dy = Tensor::from_slice(&g, &rand_vec(len, 86), &[n, c, h, w]).unwrap();
    let (dx_all, dg, db) = group_norm_backward(&x, groups, &gamma, &dy, 1e-6, true).unwrap();
    let (dx, none_g, none_b) = group_norm_backward(&x, groups, &gamma, &dy, 1e-6, false).unwrap();
    assert_eq!(dx.to_vec().unwrap(), dx_all.to_vec().unwrap());
    assert!(dg.is_some() && db.is_some());
    assert!(none_g.is_none() && none_b.is_none());
    // And on a tape where only x needs a gradient, dx is that of the full backward.
    let tape = Tape::new();
    let xv = tape.leaf(x.clone(), true);
    let gv = tape.leaf(gamma.clone(), false);
    let bv = tape.leaf(Tensor::zeros(&g, &[c]).unwrap(), false);
    let y = tape
        .group_norm(&xv, groups, &gv, &bv, 1e-6, Act::None)
        .unwrap();
    let wt = tape.leaf(dy.clone(), false);
    let loss = tape.sum(&tape.mul(&y, &wt).unwrap()).unwrap();
    let grads = tape.backward(&loss).unwrap();
    let got = grads.get(&xv).unwrap().to_vec().unwrap();
    let want = dx_all.to_vec().unwrap();
    for (a, b) in got.iter().zip(&want) {
        assert!((a - b).abs() <= 1e-6 * (1.0 + b.abs()), "{a} vs {b}");
    }
}

#[test]
fn slice_and_concat_gradients() {
    // loss = Σ w ⊙ concat([slice(x, 1, 1, 2), y], axis 1)²
    let g = gpu();
    let xv = rand_vec(2 * 4 * 3, 90);
    let yv = rand_vec(6, 91);
    let wv = rand_vec(2 * 3 * 3, 92);
    let tape = Tape::new();
    let x = tape.leaf(Tensor::from_slice(&g, &xv, &[2, 4, 3]).unwrap(), true);
    let y = tape.leaf(Tensor::from_slice(&g, &yv, &[2, 1, 3]).unwrap(), true);
    let w = tape.leaf(Tensor::from_slice(&g, &wv, &[2, 3, 3]).unwrap(), false);
    let s = tape.slice(&x, 1, 1, 2).unwrap();
    let c = tape.concat(&[&s, &y], 1).unwrap();
    let loss = tape
        .sum(&tape.mul(&tape.square(&c).unwrap(), &w).unwrap())
        .unwrap();
    let grads = tape.backward(&loss).unwrap();
    let f = |xs: &[f64], ys: &[f64]| -> f64 {
        use crate::ops::concat::{reference_concat, reference_slice};
        let s = reference_slice(xs, &[2, 4, 3], 1, 1, 2);
        let c = reference_concat(&[(&s, &[2, 2, 3]), (ys, &[2, 1, 3])], 1);
        c.iter().zip(&wv).map(|(v, &w)| v * v * w as f64).sum()
    };
    let d64 = |v: &[f32]| v.iter().map(|&q| q as f64).collect::<Vec<_>>();
    let (x64, y64) = (d64(&xv), d64(&yv));
    check(grads.get(&x).unwrap(), &fd(&|p| f(p, &y64), &xv), "dx");
    check(grads.get(&y).unwrap(), &fd(&|p| f(&x64, p), &yv), "dy");
}

#[test]
fn params_are_one_leaf_and_follow_the_tape_mode() {
    let g = gpu();
    let w = Tensor::from_slice(&g, &[2.0, 3.0], &[2]).unwrap();
    let x = Tensor::from_slice(&g, &[1.0, -1.0], &[2]).unwrap();
    // loss = Σ (w·x)·w = Σ w²x → d/dw = 2wx, accumulated over both uses of w.
    let tape = Tape::training();
    let (p1, p2) = (tape.param(&w), tape.param(&w));
    assert_eq!(p1.id(), p2.id());
    let xv = tape.leaf(x.clone(), false);
    let loss = tape
        .sum(&tape.mul(&tape.mul(&p1, &xv).unwrap(), &p2).unwrap())
        .unwrap();
    let grads = tape.backward(&loss).unwrap();
    assert_eq!(
        grads.param(&tape, &w).unwrap().to_vec().unwrap(),
        vec![4.0, -6.0]
    );
    let tape = Tape::new();
    let p = tape.param(&w);
    let xv = tape.leaf(x, true);
    let loss = tape.sum(&tape.mul(&p, &xv).unwrap()).unwrap();
    let grads = tape.backward(&loss).unwrap();
    assert!(
        grads.param(&tape, &w).is_none(),
        "inference tapes freeze parameters"
    );
    assert_eq!(grads.get(&xv).unwrap().to_vec().unwrap(), vec![2.0, 3.0]);
}

#[test]
fn gather_rows_gradient_sums_repeated_ids() {
    // loss = Σ w ⊙ table[ids], with repeated and unused ids.
    let g = gpu();
    let (v, d) = (5, 3);
    let idv: Vec<u32> = vec![4, 1, 4, 0, 4, 2, 1];
    let n = idv.len();
    let tv = rand_vec(v * d, 31);
    let wv = rand_vec(n * d, 32);
    let tape = Tape::new();
    let t = tape.leaf(Tensor::from_slice(&g, &tv, &[v, d]).unwrap(), true);
    let ids = Tensor::from_u32(&g, &idv, &[n]).unwrap();
    let y = tape.gather_rows(&t, &ids).unwrap();
    assert_eq!(y.shape(), &[n, d]);
    let w = tape.leaf(Tensor::from_slice(&g, &wv, &[n, d]).unwrap(), false);
    let loss = tape.sum(&tape.mul(&y, &w).unwrap()).unwrap();
    let grads = tape.backward(&loss).unwrap();
    let f = |x: &[f64]| -> f64 {
        idv.iter()
            .enumerate()
            .map(|(i, &id)| {
                (0..d)
                    .map(|c| x[id as usize * d + c] * wv[i * d + c] as f64)
                    .sum::<f64>()
            })
            .sum()
    };
    check(grads.get(&t).unwrap(), &fd(&f, &tv), "d table");
}

#[test]
fn warp_gradient() {
    // loss = Σ w ⊙ square(warp(x)) with x: [2, 3, 9, 9] -> [2, 3, 7, 7], one perspective and
    // one affine map (both partly outside the input, so zero padding is exercised).
    use crate::ops::warp::{homographies, reference, Homography};
    let g = gpu();
    let (n, c, s, o) = (2, 3, 9, 7);
    let xv = rand_vec(n * c * s * s, 90);
    let wv = rand_vec(n * c * o * o, 91);
    let maps = [
        Homography::from_points(
            [(0.0, 0.0), (6.0, 0.0), (6.0, 6.0), (0.0, 6.0)],
            [(-1.0, 0.5), (8.5, -0.7), (7.2, 9.4), (0.3, 7.7)],
        )
        .unwrap(),
        Homography([0.9, 0.3, -0.5, -0.2, 1.1, 1.3, 0.0, 0.0, 1.0]),
    ];
    let m = homographies(&g, &maps).unwrap();
    let tape = Tape::new();
    let x = tape.leaf(Tensor::from_slice(&g, &xv, &[n, c, s, s]).unwrap(), true);
    let wt = tape.leaf(Tensor::from_slice(&g, &wv, &[n, c, o, o]).unwrap(), false);
    let y = tape.warp(&x, &m, [o, o]).unwrap();
    let loss = tape
        .sum(&tape.mul(&tape.square(&y).unwrap(), &wt).unwrap())
        .unwrap();
    let grads = tape.backward(&loss).unwrap();
    let f = |xs: &[f64]| -> f64 {
        let (y, _) = reference(xs, &maps, c, [s, s], [o, o]);
        y.iter().zip(&wv).map(|(y, &w)| y * y * w as f64).sum()
    };
    check(grads.get(&x).unwrap(), &fd(&f, &xv), "dx");
}

#[test]
fn fused_residual_and_bthd_attention_match_the_recorded_ops() {
    // linear_residual, conv2d_residual and attention_bthd take one fused kernel when nothing
    // needs a gradient and record the composed ops otherwise; both must give the same values
    // (and the recorded path must reach the inputs' gradients).
    let g = gpu();
    let (b, t, heads, d) = (2, 5, 3, 4);
    let hd = heads * d;
    let (qv, kv, vv) = (
        rand_vec(b * t * hd, 90),
        rand_vec(b * 7 * hd, 91),
        rand_vec(b * 7 * hd, 92),
    );
    let (wv, bv, rv) = (
        rand_vec(6 * hd, 93),
        rand_vec(6, 94),
        rand_vec(b * t * 6, 95),
    );
    let (cw, cb, cx) = (
        rand_vec(6 * 3 * 9, 96),
        rand_vec(6, 97),
        rand_vec(2 * 3 * 5 * 4, 98),
    );
    let cr = rand_vec(2 * 6 * 10 * 8, 99);
    let mut outs: Vec<Vec<Vec<f32>>> = vec![];
    for needs in [false, true] {
        let tape = Tape::new();
        let t_ = |v: &[f32], s: &[usize]| tape.leaf(Tensor::from_slice(&g, v, s).unwrap(), needs);
        let q = t_(&qv, &[b, t, hd]);
        let (k, v) = (t_(&kv, &[b, 7, hd]), t_(&vv, &[b, 7, hd]));
        let mut got = vec![];
        for (h, causal) in [(heads, true), (heads, false), (1, false)] {
            let o = tape.attention_bthd(&q, &k, &v, h, causal, 0.3).unwrap();
            assert_eq!(o.shape(), [b, t, hd]);
            got.push(o);
        }
        let lin = tape
            .linear_residual(
                &q,
                &t_(&wv, &[6, hd]),
                Some(&t_(&bv, &[6])),
                Act::Gelu,
                &t_(&rv, &[b, t, 6]),
            )
            .unwrap();
        let x = t_(&cx, &[2, 3, 5, 4]);
        let conv = tape
            .conv2d_residual(
                &x,
                &t_(&cw, &[6, 3, 3, 3]),
                Some(&t_(&cb, &[6])),
                &crate::ops::conv2d::Conv2dOpts {
                    pad: [1; 4],
                    upsample: true,
                    ..Default::default()
                },
                &t_(&cr, &[2, 6, 10, 8]),
            )
            .unwrap();
        got.push(lin);
        got.push(conv.clone());
        if needs {
            let loss = tape.sum(&tape.square(&conv).unwrap()).unwrap();
            let grads = tape.backward(&loss).unwrap();
            assert!(grads.get(&x).is_some(), "the recorded conv reaches x");
        }
        outs.push(got.iter().map(|v| v.value().to_vec().unwrap()).collect());
    }
    let names = [
        "bthd causal",
        "bthd",
        "bthd one head",
        "linear_residual",
        "conv2d_residual",
    ];
    for (i, name) in names.iter().enumerate() {
        let (fused, recorded) = (&outs[0][i], &outs[1][i]);
        assert_eq!(fused.len(), recorded.len());
        for (a, r) in fused.iter().zip(recorded) {
            assert!((a - r).abs() < 1e-5 * (1.0 + r.abs()), "{name}: {a} vs {r}");
        }
    }
    // One head: [B, T, D] is [B, 1, T, D], so the reference applies directly; checked so
    // that both paths cannot agree on a wrong answer.
    let want = crate::ops::attention::reference(&qv, &kv, &vv, b, t, 7, hd, false, 0.3);
    for (a, w) in outs[0][2].iter().zip(&want) {
        assert!(
            (*a as f64 - w).abs() < 1e-5,
            "one-head bthd {a} vs reference {w}"
        );
    }
}

#[test]
fn attention_bthd_fused_gradients_match_the_composed_path() {
    // Tape::attention_bthd with gradients, fused (forward saving L, fused backward) against
    // the composed recording (permutes, matmul, mask, softmax, matmul), through
    // tape.backward of a weighted sum so that every output gradient differs. Both are f32
    // with different summation orders: agreement to 2e-5 of each gradient's largest value.
    use crate::ops::attention_backward::Path;
    let g = gpu();
    // (B, Tq, Tk, heads, D, causal): CLIP-like heads of 64, partial tiles, Tq ≠ Tk, one
    // head of 512 as in the VQGAN's AttnBlock, D not a multiple of 4.
    let cases = [
        (2, 50, 50, 4, 64, false),
        (2, 19, 19, 3, 64, true),
        (1, 13, 29, 2, 16, false),
        (1, 40, 40, 1, 512, false),
        (3, 7, 11, 2, 5, false),
    ];
    for (ci, &(b, tq, tk, heads, d, causal)) in cases.iter().enumerate() {
        let hd = heads * d;
        let s = 1000 + 10 * ci as u64;
        let (qv, kv, vv, wv) = (
            rand_vec(b * tq * hd, s),
            rand_vec(b * tk * hd, s + 1),
            rand_vec(b * tk * hd, s + 2),
            rand_vec(b * tq * hd, s + 3),
        );
        let run = |path: Path| -> Vec<Vec<f32>> {
            let tape = Tape::new();
            let leaf = |v: &[f32], t: usize| {
                tape.leaf(Tensor::from_slice(&g, v, &[b, t, hd]).unwrap(), true)
            };
            let (q, k, v) = (leaf(&qv, tq), leaf(&kv, tk), leaf(&vv, tk));
            let w = tape.leaf(Tensor::from_slice(&g, &wv, &[b, tq, hd]).unwrap(), false);
            let scale = 1.0 / (d as f32).sqrt();
            let o = tape
                .attention_bthd_path(&q, &k, &v, heads, causal, scale, path)
                .unwrap();
            let loss = tape.sum(&tape.mul(&o, &w).unwrap()).unwrap();
            let grads = tape.backward(&loss).unwrap();
            let mut out = vec![o.value().to_vec().unwrap()];
            for x in [&q, &k, &v] {
                out.push(grads.get(x).unwrap().to_vec().unwrap());
            }
            out
        };
        let (fused, composed) = (run(Path::Fused), run(Path::Composed));
        for (n, (f, c)) in ["o", "dq", "dk", "dv"]
            .iter()
            .zip(fused.iter().zip(&composed))
        {
            let m = c.iter().fold(0.0f32, |a, &x| a.max(x.abs()));
            for (i, (a, r)) in f.iter().zip(c).enumerate() {
                assert!(
                    (a - r).abs() <= 2e-5 * (m + r.abs()),
                    "case {ci} {n}[{i}]: fused {a} vs composed {r} (max {m})"
                );
            }
        }
    }
}

#[test]
fn attention_qkv_matches_attention_on_the_three_slices_on_both_paths() {
    // Tape::attention_qkv over a packed [B, T, 3·H·D] leaf, fused and composed, against
    // Tape::attention_bthd (composed) on q, k, v sliced out on the tape: the outputs and
    // the gradient of qkv (through the slices' backward for the reference), with a
    // weighted-sum loss so that every output gradient differs; and without gradients.
    use crate::ops::attention_backward::Path;
    let g = gpu();
    let cases = [
        (2, 50, 4, 64, false),
        (2, 19, 3, 64, true),
        (3, 7, 2, 5, true),
        (1, 40, 1, 512, false),
    ];
    for (ci, &(b, t, heads, d, causal)) in cases.iter().enumerate() {
        let c = heads * d;
        let s = 2000 + 10 * ci as u64;
        let (xv, wv) = (rand_vec(b * t * 3 * c, s), rand_vec(b * t * c, s + 1));
        let scale = 1.0 / (d as f32).sqrt();
        let run = |path: Option<Path>| -> Vec<Vec<f32>> {
            let tape = Tape::new();
            let qkv = tape.leaf(Tensor::from_slice(&g, &xv, &[b, t, 3 * c]).unwrap(), true);
            let w = tape.leaf(Tensor::from_slice(&g, &wv, &[b, t, c]).unwrap(), false);
            let o = match path {
                Some(p) => tape.attention_qkv_path(&qkv, heads, causal, scale, p),
                None => {
                    let part = |i: usize| tape.slice(&qkv, 2, i * c, c).unwrap();
                    tape.attention_bthd_path(
                        &part(0),
                        &part(1),
                        &part(2),
                        heads,
                        causal,
                        scale,
                        Path::Composed,
                    )
                }
            }
            .unwrap();
            let loss = tape.sum(&tape.mul(&o, &w).unwrap()).unwrap();
            let grads = tape.backward(&loss).unwrap();
            vec![
                o.value().to_vec().unwrap(),
                grads.get(&qkv).unwrap().to_vec().unwrap(),
            ]
        };
        let want = run(None);
        for path in Path::ALL {
            let got = run(Some(path));
            for (n, (f, r)) in ["o", "dqkv"].iter().zip(got.iter().zip(&want)) {
                let m = r.iter().fold(0.0f32, |a, &x| a.max(x.abs()));
                for (i, (a, r)) in f.iter().zip(r).enumerate() {
                    assert!(
                        (a - r).abs() <= 2e-5 * (m + r.abs()),
                        "case {ci} {path:?} {n}[{i}]: {a} vs {r} (max {m})"
                    );
                }
            }
        }
        // No gradient: the in-place inference kernel.
        let tape = Tape::new();
        let qkv = tape.leaf(Tensor::from_slice(&g, &xv, &[b, t, 3 * c]).unwrap(), false);
        let o = tape.attention_qkv(&qkv, heads, causal, scale).unwrap();
        assert_eq!(tape.len(), 2, "nothing recorded beyond the two leaves");
        let o = o.value().to_vec().unwrap();
        let m = want[0].iter().fold(0.0f32, |a, &x| a.max(x.abs()));
        for (a, r) in o.iter().zip(&want[0]) {
            assert!((a - r).abs() <= 2e-5 * (m + r.abs()), "case {ci} inference");
        }
    }
}

#[test]
fn linear_residual_with_gradients_keeps_the_residual_in_the_epilogue() {
    // With gradients and no activation linear_residual is one recorded matmul whose
    // epilogue adds the residual; its values and the gradients of x, W, b and the
    // residual must be those of the recorded linear + add.
    let g = gpu();
    let (b, t, cin, cout) = (2, 5, 12, 7);
    let (xv, wv, bv, rv, sv) = (
        rand_vec(b * t * cin, 300),
        rand_vec(cout * cin, 301),
        rand_vec(cout, 302),
        rand_vec(b * t * cout, 303),
        rand_vec(b * t * cout, 304),
    );
    let run = |fused: bool| -> Vec<Vec<f32>> {
        let tape = Tape::new();
        let t_ = |v: &[f32], s: &[usize]| tape.leaf(Tensor::from_slice(&g, v, s).unwrap(), true);
        let (x, w, bias, r) = (
            t_(&xv, &[b, t, cin]),
            t_(&wv, &[cout, cin]),
            t_(&bv, &[cout]),
            t_(&rv, &[b, t, cout]),
        );
        let y = if fused {
            let before = tape.len();
            let y = tape
                .linear_residual(&x, &w, Some(&bias), Act::None, &r)
                .unwrap();
            assert_eq!(tape.len(), before + 1, "one node: no separate add");
            y
        } else {
            let l = tape.linear(&x, &w, Some(&bias), Act::None).unwrap();
            tape.add(&r, &l).unwrap()
        };
        let s = tape.leaf(Tensor::from_slice(&g, &sv, &[b, t, cout]).unwrap(), false);
        let grads = tape
            .backward(&tape.sum(&tape.mul(&y, &s).unwrap()).unwrap())
            .unwrap();
        let mut out = vec![y.value().to_vec().unwrap()];
        for v in [&x, &w, &bias, &r] {
            out.push(grads.get(v).unwrap().to_vec().unwrap());
        }
        out
    };
    let (fused, recorded) = (run(true), run(false));
    for (n, (f, r)) in ["y", "dx", "dw", "db", "dr"]
        .iter()
        .zip(fused.iter().zip(&recorded))
    {
        for (a, r) in f.iter().zip(r) {
            assert!((a - r).abs() < 1e-5 * (1.0 + r.abs()), "{n}: {a} vs {r}");
        }
    }
}
