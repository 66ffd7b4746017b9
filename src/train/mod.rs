//! Training vqclip's own small models on the autodiff tape: weight initialisation, learning
//! rate schedules, checkpoints that resume, and the two trainers ([`vqgan`], [`clip`]).
//!
//! A model is built from a config plus weights from [`init_weights`]; its `params`
//! ([`NamedParams`]) are the tensors the optimiser updates in place and the writers save
//! under the reference implementations' keys.

pub mod clip;
pub mod vqgan;

use crate::optim::Adam;
use crate::weights::{MemorySource, NamedParams, SafetensorsFile, TensorSource};
use crate::{Error, Result};
use rand::SeedableRng;
use rand_distr::{Distribution, Normal, Uniform};
use std::path::Path;

/// How one tensor starts.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Init {
    /// Every value equal to this.
    Const(f32),
    /// Uniform in `[-a, a]`.
    Uniform(f32),
    /// Normal with mean 0 and this standard deviation.
    Normal(f32),
}

/// PyTorch's default for a layer weight of `shape` (`[out, in, ...]`): Kaiming-uniform with
/// `a = √5`, i.e. uniform in `±1/√fan_in` (also its bias default, given the weight's fan-in).
pub fn default_init(shape: &[usize]) -> Init {
    let fan_in = shape.iter().skip(1).product::<usize>().max(1) as f32;
    Init::Uniform(1.0 / fan_in.sqrt())
}

/// Weights for every `(key, shape)` of a model: `rule(key, shape)` decides each tensor's
/// [`Init`]; values come from one seeded stream in key order, so a seed fixes them all.
pub fn init_weights(
    shapes: &[(String, Vec<usize>)],
    seed: u64,
    rule: impl Fn(&str, &[usize]) -> Init,
) -> Result<MemorySource> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let mut src = MemorySource::new(format!("initial weights (seed {seed})"));
    for (key, shape) in shapes {
        let n: usize = shape.iter().product();
        let data: Vec<f32> = match rule(key, shape) {
            Init::Const(c) => vec![c; n],
            Init::Uniform(a) => {
                let d = Uniform::new_inclusive(-a, a).map_err(|e| Error::invalid(e.to_string()))?;
                (0..n).map(|_| d.sample(&mut rng)).collect()
            }
            Init::Normal(std) => {
                let d = Normal::new(0.0, std).map_err(|e| Error::invalid(e.to_string()))?;
                (0..n).map(|_| d.sample(&mut rng)).collect()
            }
        };
        src.insert(key.clone(), shape, data)?;
    }
    Ok(src)
}

/// A learning-rate schedule over optimiser steps.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Schedule {
    /// Peak learning rate.
    pub lr: f32,
    /// Steps of linear warm-up from 0 to `lr`.
    pub warmup: usize,
    /// Total steps; after warm-up the rate follows a cosine from `lr` down to `lr · floor`.
    pub total: usize,
    /// Final rate as a fraction of `lr`.
    pub floor: f32,
}

impl Schedule {
    /// The learning rate at `step` (0-based).
    pub fn at(&self, step: usize) -> f32 {
        if step < self.warmup {
            return self.lr * (step + 1) as f32 / self.warmup as f32;
        }
        let span = self.total.saturating_sub(self.warmup).max(1);
        let t = ((step - self.warmup) as f32 / span as f32).min(1.0);
        let cos = 0.5 * (1.0 + (std::f32::consts::PI * t).cos());
        self.lr * (self.floor + (1.0 - self.floor) * cos)
    }
}

/// Fits a training run into a wall-clock budget (`--time-limit`).
///
/// The first [`TimeBudget::SKIP`] steps of a session are not timed (they include shader
/// compilation and kernel tuning); the next [`TimeBudget::MEASURE`] steps give the time per
/// step, from which the run's total is cut to what fits in the budget, once, so that the
/// learning-rate schedule (which follows the total) still anneals to its end. Should the
/// steps later slow down, [`TimeBudget::observe`] ends the run at the budget.
#[derive(Debug, Clone)]
pub struct TimeBudget {
    limit_s: f64,
    start: std::time::Instant,
    first: usize,
    mark: Option<std::time::Instant>,
    fitted: bool,
}

impl TimeBudget {
    /// Steps at the start of a session that are not timed.
    pub const SKIP: usize = 5;
    /// Steps timed to estimate the time per step.
    pub const MEASURE: usize = 20;

    /// A budget of `limit_s` seconds from now, for a session starting at step `first`.
    pub fn new(limit_s: f64, first: usize) -> Self {
        TimeBudget {
            limit_s,
            start: std::time::Instant::now(),
            first,
            mark: None,
            fitted: false,
        }
    }

    /// Seconds since the budget started.
    pub fn elapsed(&self) -> f64 {
        self.start.elapsed().as_secs_f64()
    }

    /// Called after each optimiser step with the steps `done` so far and the run's `total`;
    /// returns the new total where the budget changes it (never below `done`).
    pub fn observe(&mut self, done: usize, total: usize) -> Option<usize> {
        let since = done.saturating_sub(self.first);
        if since == Self::SKIP {
            self.mark = Some(std::time::Instant::now());
        }
        if !self.fitted && since == Self::SKIP + Self::MEASURE {
            self.fitted = true;
            if let Some(mark) = self.mark {
                let per_step = mark.elapsed().as_secs_f64() / Self::MEASURE as f64;
                let left = (self.limit_s - self.elapsed()).max(0.0);
                let fits = done + (0.97 * left / per_step.max(1e-9)) as usize;
                let new = total.min(fits).max(done);
                return (new != total).then_some(new);
            }
        }
        (self.elapsed() >= self.limit_s && done < total).then_some(done)
    }
}

/// A tensor on the CPU: `(key, shape, values)`.
pub type HostTensor = (String, Vec<usize>, Vec<f32>);

/// Reads every parameter to the CPU.
pub fn download(params: &NamedParams) -> Result<Vec<HostTensor>> {
    params
        .iter()
        .map(|(k, t)| Ok((k.clone(), t.shape().to_vec(), t.to_vec()?)))
        .collect()
}

/// Writes named f32 tensors to a `.safetensors` file (through a temporary file and a
/// rename, so a failure never leaves a partial file), with `metadata` in the header.
pub fn write_safetensors(
    path: &Path,
    tensors: &[HostTensor],
    metadata: &[(&str, String)],
) -> Result<()> {
    let views = tensors
        .iter()
        .map(|(k, shape, v)| {
            safetensors::tensor::TensorView::new(
                safetensors::Dtype::F32,
                shape.clone(),
                bytemuck::cast_slice(v),
            )
            .map(|view| (k.clone(), view))
            .map_err(|e| Error::invalid(format!("tensor '{k}': {e}")))
        })
        .collect::<Result<Vec<_>>>()?;
    let meta = metadata
        .iter()
        .map(|(k, v)| (k.to_string(), v.clone()))
        .collect::<std::collections::HashMap<_, _>>();
    let bytes = safetensors::serialize(views, Some(meta))
        .map_err(|e| Error::invalid(format!("{}: {e}", path.display())))?;
    write_atomic(path, &bytes)
}

/// Writes `bytes` to `path` through [`crate::atomic`] (a synced temporary file with a unique
/// name, then a rename), creating its folder first. A checkpoint killed mid-write leaves the
/// previous one in place; resuming reads only the final name.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let io = |source| Error::Io {
        path: path.display().to_string(),
        source,
    };
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty());
    if let Some(d) = dir {
        std::fs::create_dir_all(d).map_err(io)?;
    }
    crate::atomic::write(path, bytes)
}

/// Saves a resumable training state to `path` (`.safetensors`): the parameters under their
/// keys, the optimiser moments under `optim.m.<key>` / `optim.v.<key>`, and the step count
/// plus `extra` in the metadata.
pub fn save_state(
    path: &Path,
    params: &NamedParams,
    optim: &Adam,
    step: usize,
    extra: &[(&str, String)],
) -> Result<()> {
    let mut tensors = download(params)?;
    let (m, v) = optim.moments();
    for (i, (k, t)) in params.iter().enumerate() {
        tensors.push((format!("optim.m.{k}"), t.shape().to_vec(), m[i].to_vec()?));
        tensors.push((format!("optim.v.{k}"), t.shape().to_vec(), v[i].to_vec()?));
    }
    let mut meta: Vec<(&str, String)> = vec![
        ("step", step.to_string()),
        ("optim_steps", optim.steps().to_string()),
    ];
    meta.extend(extra.iter().cloned());
    write_safetensors(path, &tensors, &meta)
}

/// A training state read back by [`load_state`].
pub struct State {
    /// Steps done.
    pub step: usize,
    /// The header metadata (`step`, `optim_steps` and the trainer's extras).
    pub metadata: std::collections::HashMap<String, String>,
}

/// Restores a state written by [`save_state`] into `params` (values copied into the existing
/// buffers) and `optim`. Every parameter must be present with its shape.
pub fn load_state(path: &Path, params: &NamedParams, optim: &mut Adam) -> Result<State> {
    let file = SafetensorsFile::open(path)?;
    let metadata = file.metadata();
    let num = |k: &str| -> Result<usize> {
        metadata
            .get(k)
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| Error::Format {
                path: path.display().to_string(),
                msg: format!("not a vqclip training state (no '{k}' in its metadata)"),
            })
    };
    let step = num("step")?;
    let optim_steps = num("optim_steps")? as u32;
    let (mut m, mut v) = (Vec::new(), Vec::new());
    for (k, t) in params {
        let read = |key: &str| -> Result<Vec<f32>> {
            match file.shape(key) {
                Some(s) if s == t.shape() => file.read_f32(key),
                Some(s) => Err(Error::Format {
                    path: path.display().to_string(),
                    msg: format!(
                        "tensor '{key}' has shape {s:?} but the model has {:?}",
                        t.shape()
                    ),
                }),
                None => Err(Error::Format {
                    path: path.display().to_string(),
                    msg: format!("missing tensor '{key}'"),
                }),
            }
        };
        let values = read(k)?;
        t.assign(&crate::Tensor::from_slice(t.gpu(), &values, t.shape())?)?;
        m.push(read(&format!("optim.m.{k}"))?);
        v.push(read(&format!("optim.v.{k}"))?);
    }
    optim.restore(&m, &v, optim_steps)?;
    Ok(State { step, metadata })
}

/// Opens a JSON-lines training log for appending, after dropping the lines of steps later
/// than `done` (the steps a resumed run will do again: a run that stopped between two
/// checkpoints logged them once already). Lines without a `"step"` number are kept.
pub fn open_log_resumed(path: &Path, done: usize) -> Result<std::fs::File> {
    if let Ok(text) = std::fs::read_to_string(path) {
        let later = |line: &str| {
            serde_json::from_str::<serde_json::Value>(line)
                .ok()
                .and_then(|v| v.get("step").and_then(|s| s.as_u64()))
                .is_some_and(|s| s > done as u64)
        };
        let mut kept = String::with_capacity(text.len());
        let mut dropped = false;
        for line in text.lines() {
            if later(line) {
                dropped = true;
            } else {
                kept.push_str(line);
                kept.push('\n');
            }
        }
        if dropped {
            write_atomic(path, kept.as_bytes())?;
        }
    }
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|source| Error::Io {
            path: path.display().to_string(),
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_resumed_log_forgets_the_steps_that_will_be_redone() {
        let dir = std::env::temp_dir().join(format!("vqclip-log-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("log.jsonl");
        let lines = [
            "{\"step\":1,\"loss\":2}",
            "{\"step\":2}",
            "note",
            "{\"step\":3}",
        ];
        std::fs::write(&p, lines.join("\n") + "\n").unwrap();
        {
            use std::io::Write;
            let mut f = open_log_resumed(&p, 2).unwrap();
            writeln!(f, "{{\"step\":3,\"again\":true}}").unwrap();
        }
        let got = std::fs::read_to_string(&p).unwrap();
        assert_eq!(
            got,
            "{\"step\":1,\"loss\":2}\n{\"step\":2}\nnote\n{\"step\":3,\"again\":true}\n"
        );
        // every line later than `done`: an empty file, not a blank line
        let r = dir.join("redo.jsonl");
        std::fs::write(&r, "{\"step\":1}\n{\"step\":2}\n").unwrap();
        open_log_resumed(&r, 0).unwrap();
        assert_eq!(std::fs::read_to_string(&r).unwrap(), "");
        // nothing later than `done`: the file is left as it is; no file: a new one
        open_log_resumed(&p, 5).unwrap();
        assert_eq!(std::fs::read_to_string(&p).unwrap(), got);
        let q = dir.join("new.jsonl");
        open_log_resumed(&q, 0).unwrap();
        assert!(q.exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn time_budget_cuts_the_total_to_what_fits_then_stops_at_the_limit() {
        // 20 ms steps in a 2 s budget: after 25 steps (>= 0.5 s) at most 1.5 s are left,
        // which holds at most 75 more steps however slow the machine is.
        let mut b = TimeBudget::new(2.0, 0);
        let mut fitted = None;
        for done in 1..=TimeBudget::SKIP + TimeBudget::MEASURE {
            std::thread::sleep(std::time::Duration::from_millis(20));
            if let Some(n) = b.observe(done, 1000) {
                fitted = Some((done, n));
            }
        }
        let (at, n) = fitted.expect("the budget must cut a 1000-step run");
        assert_eq!(at, TimeBudget::SKIP + TimeBudget::MEASURE);
        assert!((at..=at + 75).contains(&n), "fitted total {n}");
        // A run that fits is left alone.
        let mut b = TimeBudget::new(1000.0, 10);
        for done in 11..=40 {
            assert_eq!(b.observe(done, 50), None);
        }
        // Past the limit the run ends at the step it reached.
        let mut b = TimeBudget::new(0.0, 0);
        b.fitted = true;
        assert_eq!(b.observe(7, 50), Some(7));
        assert_eq!(b.observe(50, 50), None);
    }

    #[test]
    fn schedule_warms_up_then_decays_to_the_floor() {
        let s = Schedule {
            lr: 1.0,
            warmup: 10,
            total: 110,
            floor: 0.1,
        };
        assert!((s.at(0) - 0.1).abs() < 1e-6);
        assert!((s.at(9) - 1.0).abs() < 1e-6);
        assert!((s.at(10) - 1.0).abs() < 1e-6);
        assert!((s.at(60) - 0.55).abs() < 1e-5);
        assert!((s.at(110) - 0.1).abs() < 1e-6);
        assert!((s.at(500) - 0.1).abs() < 1e-6);
    }

    #[test]
    fn init_is_seeded_and_follows_the_rule() {
        let shapes = vec![
            ("a.weight".to_string(), vec![4, 3]),
            ("a.bias".to_string(), vec![4]),
        ];
        let rule = |k: &str, s: &[usize]| {
            if k.ends_with("bias") {
                Init::Const(0.5)
            } else {
                default_init(s)
            }
        };
        let x = init_weights(&shapes, 7, rule).unwrap();
        let y = init_weights(&shapes, 7, rule).unwrap();
        let w = x.read_f32("a.weight").unwrap();
        assert_eq!(w, y.read_f32("a.weight").unwrap());
        assert!(w.iter().all(|v| v.abs() <= 1.0 / 3f32.sqrt()));
        assert!(w.iter().any(|v| *v != w[0]));
        assert_eq!(x.read_f32("a.bias").unwrap(), vec![0.5; 4]);
    }

    #[test]
    fn state_round_trips_through_a_file() {
        let g = crate::ops::testutil::gpu();
        let a = crate::Tensor::from_slice(&g, &[1.0, 2.0, 3.0], &[3]).unwrap();
        let params: NamedParams = vec![("w".into(), a.clone())];
        let mut opt = Adam::new(vec![a.clone()], crate::optim::AdamConfig::adam(0.1)).unwrap();
        let grad = crate::Tensor::from_slice(&g, &[1.0, -1.0, 0.5], &[3]).unwrap();
        opt.step(&[Some(&grad)]).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.safetensors");
        save_state(&path, &params, &opt, 5, &[("kind", "test".into())]).unwrap();
        let saved = a.to_vec().unwrap();
        opt.step(&[Some(&grad)]).unwrap();
        let after_two = a.to_vec().unwrap();
        let mut opt2 = Adam::new(vec![a.clone()], crate::optim::AdamConfig::adam(0.1)).unwrap();
        let st = load_state(&path, &params, &mut opt2).unwrap();
        assert_eq!(st.step, 5);
        assert_eq!(st.metadata.get("kind").map(String::as_str), Some("test"));
        assert_eq!(a.to_vec().unwrap(), saved);
        opt2.step(&[Some(&grad)]).unwrap();
        assert_eq!(
            a.to_vec().unwrap(),
            after_two,
            "resumed step equals the uninterrupted one"
        );
    }
}
