use super::*;
use crate::ops::attention::reference;
use crate::ops::testutil::{gpu, rand_vec};

/// `[B·H, T, D]` (the references' layout) → `[B, T, H·D]`.
fn to_bthd(x: &[f32], b: usize, h: usize, t: usize, d: usize) -> Vec<f32> {
    let mut y = vec![0.0; x.len()];
    for bi in 0..b {
        for hi in 0..h {
            for ti in 0..t {
                for di in 0..d {
                    y[((bi * t + ti) * h + hi) * d + di] = x[(((bi * h + hi) * t) + ti) * d + di];
                }
            }
        }
    }
    y
}

/// `[B, T, H·D]` → `[B·H, T, D]`.
fn from_bthd(y: &[f32], b: usize, h: usize, t: usize, d: usize) -> Vec<f32> {
    let mut x = vec![0.0; y.len()];
    for bi in 0..b {
        for hi in 0..h {
            for ti in 0..t {
                for di in 0..d {
                    x[(((bi * h + hi) * t) + ti) * d + di] = y[((bi * t + ti) * h + hi) * d + di];
                }
            }
        }
    }
    x
}

/// Checks `got` against `want` with |err| ≤ `rel`·max|want| + `rel`·|want|: gradients sum
/// Tq (or Tk) products of recomputed probabilities, so their f32 error scales with the
/// tensor's magnitude rather than each element's. Returns the worst err / max|want|.
fn check_close(got: &[f32], want: &[f64], rel: f64, what: &str) -> f64 {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let scale = want.iter().fold(0.0f64, |a, &w| a.max(w.abs())).max(1e-30);
    let mut worst = 0.0f64;
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let err = (g as f64 - w).abs();
        assert!(
            err <= rel * (scale + w.abs()),
            "{what}: element {i} got {g} want {w} (err {err:e}, max|want| {scale:e}, rel {rel:e})"
        );
        worst = worst.max(err / scale);
    }
    worst
}

/// Runs the fused forward (o, L) and backward on random data and compares all five against
/// the f64 references. `amp` multiplies q and k: scores grow as amp²·scale·Σ q·k.
#[allow(clippy::too_many_arguments)]
fn check(
    b: usize,
    h: usize,
    tq: usize,
    tk: usize,
    d: usize,
    causal: bool,
    amp: f32,
    rel: f64,
    seed: u64,
) {
    let g = gpu();
    let bh = b * h;
    let qv: Vec<f32> = rand_vec(bh * tq * d, seed)
        .iter()
        .map(|x| x * amp)
        .collect();
    let kv: Vec<f32> = rand_vec(bh * tk * d, seed + 1)
        .iter()
        .map(|x| x * amp)
        .collect();
    let vv = rand_vec(bh * tk * d, seed + 2);
    let gv = rand_vec(bh * tq * d, seed + 3);
    let scale = 1.0 / (d as f32).sqrt();
    let t = |x: &[f32], n: usize| Tensor::from_slice(&g, &to_bthd(x, b, h, n, d), &[b, n, h * d]);
    let (qt, kt, vt, gt) = (
        t(&qv, tq).unwrap(),
        t(&kv, tk).unwrap(),
        t(&vv, tk).unwrap(),
        t(&gv, tq).unwrap(),
    );
    let what = format!("B{b} H{h} Tq{tq} Tk{tk} D{d} causal {causal} amp {amp}");
    let (o, lse) = attention_bthd_lse(&qt, &kt, &vt, h, causal, scale).unwrap();
    assert_eq!(lse.shape(), &[b, h, tq]);
    let want = reference_backward(&qv, &kv, &vv, &gv, bh, tq, tk, d, causal, scale);
    let want_o = reference(&qv, &kv, &vv, bh, tq, tk, d, causal, scale);
    let got_o = from_bthd(&o.to_vec().unwrap(), b, h, tq, d);
    check_close(&got_o, &want_o, rel, &format!("{what} o"));
    // L is a log: absolute error, relative to the largest score magnitude.
    let smax = want.lse.iter().fold(1.0f64, |a, &l| a.max(l.abs()));
    for (i, (&got, &w)) in lse.to_vec().unwrap().iter().zip(&want.lse).enumerate() {
        assert!(
            (got as f64 - w).abs() <= rel * smax,
            "{what} lse {i}: got {got} want {w}"
        );
    }
    let grads =
        attention_bthd_backward(&qt, &kt, &vt, &o, &lse, &gt, h, causal, scale, [true; 3]).unwrap();
    let back = |t: &Option<Tensor>, n: usize| {
        from_bthd(&t.as_ref().unwrap().to_vec().unwrap(), b, h, n, d)
    };
    check_close(&back(&grads.dq, tq), &want.dq, rel, &format!("{what} dq"));
    check_close(&back(&grads.dk, tk), &want.dk, rel, &format!("{what} dk"));
    check_close(&back(&grads.dv, tk), &want.dv, rel, &format!("{what} dv"));
}

#[test]
fn reference_backward_matches_finite_differences() {
    // The f64 reference backward against central differences of the f64 forward
    // reference, with loss = Σ o·dO.
    let (bh, tq, tk, d, scale) = (2, 3, 4, 3, 0.7f32);
    for causal in [false, true] {
        let f = |x: &[f32]| x.iter().map(|&a| a as f64).collect::<Vec<f64>>();
        let (q, k, v, go) = (
            f(&rand_vec(bh * tq * d, 1)),
            f(&rand_vec(bh * tk * d, 2)),
            f(&rand_vec(bh * tk * d, 3)),
            f(&rand_vec(bh * tq * d, 4)),
        );
        let want = reference_backward(&q, &k, &v, &go, bh, tq, tk, d, causal, scale);
        let loss = |q: &[f64], k: &[f64], v: &[f64]| -> f64 {
            reference(q, k, v, bh, tq, tk, d, causal, scale)
                .iter()
                .zip(&go)
                .map(|(a, b)| a * b)
                .sum()
        };
        let eps = 1e-6;
        for (which, grad) in [(0, &want.dq), (1, &want.dk), (2, &want.dv)] {
            for i in 0..grad.len() {
                let mut ins = [q.clone(), k.clone(), v.clone()];
                ins[which][i] += eps;
                let up = loss(&ins[0], &ins[1], &ins[2]);
                ins[which][i] -= 2.0 * eps;
                let down = loss(&ins[0], &ins[1], &ins[2]);
                let fd = (up - down) / (2.0 * eps);
                assert!(
                    (fd - grad[i]).abs() < 1e-7,
                    "causal {causal} input {which} [{i}]: fd {fd} analytic {}",
                    grad[i]
                );
            }
        }
    }
}

#[test]
fn attention_backward_matches_reference_over_shapes() {
    // Partial tiles and partial workgroups (T not a multiple of 8 or of the tile rows),
    // Tq ≠ Tk, several heads and batches, D not a multiple of 4, CLIP's shapes.
    let cases = [
        (1, 1, 1, 1, 1),
        (2, 3, 5, 7, 3),
        (1, 2, 17, 65, 17),
        (2, 2, 65, 17, 8),
        (2, 12, 50, 50, 64),
        (1, 8, 77, 77, 64),
    ];
    let mut seed = 0;
    for &(b, h, tq, tk, d) in &cases {
        for causal in [false, true] {
            seed += 10;
            check(b, h, tq, tk, d, causal, 1.0, 2e-5, seed);
        }
    }
}

#[test]
fn attention_backward_large_head_dim_and_splits() {
    // VQGAN's AttnBlock: one head of 512 channels; 256 positions cut the walked rows into
    // splits (the span at D = 512 is far below 256), summed by attn_bwd_sum.
    assert!(span(512, 8) < 256, "span {}", span(512, 8));
    check(1, 1, 256, 256, 512, false, 1.0, 2e-5, 500);
    check(1, 1, 130, 70, 512, true, 1.0, 2e-5, 510);
    // Long rows at a small D: two splits of many tiles, over the keys (dQ) and over the
    // queries (dK, dV).
    assert!(span(4, 8) < 20_000, "span {}", span(4, 8));
    check(1, 1, 40, 20_000, 4, false, 1.0, 2e-5, 520);
    check(1, 1, 20_000, 40, 4, false, 1.0, 2e-5, 530);
    check(1, 1, 3000, 3000, 2, true, 1.0, 2e-5, 540);
}

#[test]
fn attention_backward_is_stable_at_large_scores() {
    // q, k ~ ±9·U(-1, 1) with D = 64 and scale 1/8: scores reach ±80 and more, where
    // exp(s) alone overflows f32; exp(s − L) stays ≤ 1. The tolerance is looser because
    // a score of 80 carries ~80·ε·√D of rounding into exp.
    let amp = 9.0;
    let (tq, tk, d) = (33, 41, 64);
    let q = rand_vec(tq * d, 900);
    let k = rand_vec(tk * d, 901);
    let s = reference_backward(
        &q.iter().map(|x| x * amp).collect::<Vec<_>>(),
        &k.iter().map(|x| x * amp).collect::<Vec<_>>(),
        &rand_vec(tk * d, 902),
        &rand_vec(tq * d, 903),
        1,
        tq,
        tk,
        d,
        false,
        1.0 / (d as f32).sqrt(),
    );
    let lmax = s.lse.iter().fold(0.0f64, |a, &l| a.max(l.abs()));
    assert!(lmax > 80.0, "largest |L| only {lmax}");
    check(1, 1, tq, tk, d, false, amp, 5e-4, 900);
    check(2, 3, tq, tk, d, true, amp, 5e-4, 910);
}

#[test]
fn attention_backward_only_what_is_needed() {
    let g = gpu();
    let (b, h, t, d) = (1, 2, 9, 8);
    let x = |s| Tensor::from_slice(&g, &rand_vec(b * t * h * d, s), &[b, t, h * d]).unwrap();
    let (q, k, v, dout) = (x(1), x(2), x(3), x(4));
    let (o, lse) = attention_bthd_lse(&q, &k, &v, h, true, 0.5).unwrap();
    let all =
        attention_bthd_backward(&q, &k, &v, &o, &lse, &dout, h, true, 0.5, [true; 3]).unwrap();
    for need in [
        [true, false, false],
        [false, true, false],
        [false, false, true],
    ] {
        let r = attention_bthd_backward(&q, &k, &v, &o, &lse, &dout, h, true, 0.5, need).unwrap();
        for (want, (a, got)) in
            need.iter()
                .zip([(&all.dq, &r.dq), (&all.dk, &r.dk), (&all.dv, &r.dv)])
        {
            assert_eq!(*want, got.is_some());
            if let Some(got) = got {
                assert_eq!(got.to_vec().unwrap(), a.as_ref().unwrap().to_vec().unwrap());
            }
        }
    }
    let bad = Tensor::zeros(&g, &[1, 9, 2]).unwrap();
    let e = attention_bthd_backward(&q, &k, &v, &o, &bad, &dout, h, true, 0.5, [true; 3])
        .unwrap_err()
        .to_string();
    assert!(e.contains("lse"), "{e}");
}

#[test]
fn packed_qkv_gradient_is_the_three_gradients_side_by_side() {
    // attention_qkv_backward writes dQ, dK, dV in place into [B, T, 3·H·D]; each third
    // must equal attention_bthd_backward on the parts copied out (same kernels and order:
    // the same bits), with and without split partials (D = 512 over 200 queries walks two
    // spans), causal or not, D not a multiple of 4.
    use crate::ops::attention::{attention_qkv_lse, bthd_dims};
    use crate::ops::concat::slice;
    let g = gpu();
    let cases = [
        (2, 50, 12, 64, false),
        (2, 19, 3, 64, true),
        (3, 7, 2, 5, false),
        (1, 200, 1, 512, true),
    ];
    for (ci, &(b, t, h, d, causal)) in cases.iter().enumerate() {
        let c = h * d;
        let seed = 500 + 10 * ci as u64;
        let qkv = Tensor::from_slice(&g, &rand_vec(b * t * 3 * c, seed), &[b, t, 3 * c]).unwrap();
        let dout = Tensor::from_slice(&g, &rand_vec(b * t * c, seed + 1), &[b, t, c]).unwrap();
        let scale = 1.0 / (d as f32).sqrt();
        let (o, lse) = attention_qkv_lse(&qkv, h, causal, scale).unwrap();
        let got = attention_qkv_backward(&qkv, &o, &lse, &dout, h, causal, scale).unwrap();
        assert_eq!(got.shape(), qkv.shape());
        let part = |x: &Tensor, s: usize| slice(x, 2, s * c, c).unwrap();
        let (q, k, v) = (part(&qkv, 0), part(&qkv, 1), part(&qkv, 2));
        assert_eq!(bthd_dims(&q, &k, &v, h).unwrap(), [b, h, t, t, d]);
        let want =
            attention_bthd_backward(&q, &k, &v, &o, &lse, &dout, h, causal, scale, [true; 3])
                .unwrap();
        for (s, (n, w)) in [("dq", &want.dq), ("dk", &want.dk), ("dv", &want.dv)]
            .into_iter()
            .enumerate()
        {
            assert_eq!(
                part(&got, s).to_vec().unwrap(),
                w.as_ref().unwrap().to_vec().unwrap(),
                "case {ci} {n}"
            );
        }
    }
}
