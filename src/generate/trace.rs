//! `generate --trace DIR`: the optimisation loop's tensors on disk, step by step.
//!
//! For step 0 and every `every`-th step after it, [`Tracer`] writes
//! `DIR/step{n:05}.safetensors` (f32) holding
//!
//! - `z` `[1, E, h, w]`: the optimised latent the step starts from (on the coarse grid of the
//!   current phase when `latent_grids` is on, since that is the tensor Adam updates);
//! - `grad_z` (same shape): dL/dz of that step, before the optimiser uses it;
//! - `image` `[3, H, W]`: the decoded image in [0, 1] (after `ClampWithGrad`);
//! - `cutouts` `[cutn, 3, S, S]`: what CLIP sees, augmentations and noise included, before
//!   CLIP's mean/std normalisation;
//! - `loss` (a scalar, shape `[]`): the total loss;
//! - `prompt_losses` `[n_prompts]`: each prompt's weighted loss (text, image, noise prompts).
//!
//! `DIR/trace.json` describes the run (options, prompts) and lists the steps written so far;
//! it is rewritten after each step file, so it never names a file that is not there. Every
//! file goes through [`crate::atomic`]: a killed run leaves complete files only.
//!
//! The GPU→CPU copies happen only on traced steps: the other steps run as without a trace.

use super::{Init, Options, StepLog};
use crate::train::{write_safetensors, HostTensor};
use crate::{Error, Result, Tensor};
use serde_json::json;
use std::path::{Path, PathBuf};

/// Steps between two traced steps when the caller does not say (`--trace-every`): a
/// 100-step reference run gives 11 files, enough to watch it converge without writing a
/// cutout batch every step.
pub const DEFAULT_TRACE_EVERY: usize = 10;

/// Where and how often to trace (see the module doc).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceOptions {
    /// The folder the step files and `trace.json` go to (made if missing).
    pub dir: PathBuf,
    /// Trace step 0 and every `every`-th step (at least 1).
    pub every: usize,
}

impl TraceOptions {
    /// A trace into `dir` every [`DEFAULT_TRACE_EVERY`] steps.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        TraceOptions {
            dir: dir.into(),
            every: DEFAULT_TRACE_EVERY,
        }
    }

    /// Refuses a zero interval (checked with the other [`Options`] values).
    pub fn check(&self) -> Result<()> {
        if self.every == 0 {
            return Err(Error::invalid("--trace-every must be at least 1"));
        }
        Ok(())
    }

    /// Whether step `step` (0-based) is traced.
    pub fn due(&self, step: usize) -> bool {
        self.every > 0 && step.is_multiple_of(self.every)
    }

    /// The file step `step` is written to.
    pub fn step_path(&self, step: usize) -> PathBuf {
        self.dir.join(format!("step{step:05}.safetensors"))
    }
}

/// Makes the trace folder `dir` (and its parents) and checks that a file can be created in
/// it, so that a bad `--trace` fails before any model work rather than after the first step.
pub fn prepare_dir(dir: &Path) -> Result<()> {
    if dir.exists() && !dir.is_dir() {
        return Err(Error::invalid(format!(
            "--trace {}: is a file, not a folder",
            dir.display()
        )));
    }
    std::fs::create_dir_all(dir).map_err(|e| {
        Error::invalid(format!(
            "--trace {}: cannot create the folder: {e}",
            dir.display()
        ))
    })?;
    tempfile::tempfile_in(dir).map_err(|e| {
        Error::invalid(format!(
            "--trace {}: cannot write files in the folder: {e}",
            dir.display()
        ))
    })?;
    Ok(())
}

/// One traced step's tensors, copied to the CPU before the optimiser changes `z`.
pub(super) struct StepTensors(Vec<HostTensor>);

/// Writes the trace of one generation (see the module doc).
pub(super) struct Tracer {
    opts: TraceOptions,
    run: serde_json::Value,
    written: Vec<usize>,
}

impl Tracer {
    /// Prepares the folder ([`prepare_dir`]) for a run of `opts`.
    pub(super) fn create(trace: &TraceOptions, opts: &Options) -> Result<Self> {
        trace.check()?;
        prepare_dir(&trace.dir)?;
        Ok(Tracer {
            opts: trace.clone(),
            run: describe(opts),
            written: Vec::new(),
        })
    }

    /// Whether step `step` is traced.
    pub(super) fn due(&self, step: usize) -> bool {
        self.opts.due(step)
    }

    /// Copies the step's tensors to the CPU: `z` and `grad_z` `[1, E, h, w]`, `image`
    /// `[1, 3, H, W]` (stored as `[3, H, W]`), `cutouts` `[cutn, 3, S, S]`.
    pub(super) fn read(
        &self,
        z: &Tensor,
        grad_z: &Tensor,
        image: &Tensor,
        cutouts: &Tensor,
    ) -> Result<StepTensors> {
        let host = |name: &str, t: &Tensor, shape: &[usize]| -> Result<HostTensor> {
            Ok((name.to_string(), shape.to_vec(), t.to_vec()?))
        };
        let image_shape = match image.shape() {
            [1, c, h, w] => [*c, *h, *w],
            s => {
                return Err(Error::shape(format!(
                    "trace: the image should be [1, 3, H, W], got {s:?}"
                )))
            }
        };
        Ok(StepTensors(vec![
            host("z", z, z.shape())?,
            host("grad_z", grad_z, grad_z.shape())?,
            host("image", image, &image_shape)?,
            host("cutouts", cutouts, cutouts.shape())?,
        ]))
    }

    /// Writes `step{n:05}.safetensors` with `tensors` and the step's losses, then
    /// `trace.json` listing it.
    pub(super) fn write(&mut self, log: &StepLog, tensors: StepTensors) -> Result<()> {
        let mut all = tensors.0;
        all.push(("loss".into(), vec![], vec![log.loss]));
        all.push((
            "prompt_losses".into(),
            vec![log.prompt_losses.len()],
            log.prompt_losses.clone(),
        ));
        let meta = [("step", log.step.to_string())];
        write_safetensors(&self.opts.step_path(log.step), &all, &meta)?;
        self.written.push(log.step);
        let mut doc = self.run.clone();
        doc["every"] = json!(self.opts.every);
        doc["steps_written"] = json!(self.written);
        let text = serde_json::to_string_pretty(&doc)
            .map_err(|e| Error::invalid(format!("trace.json: {e}")))?;
        crate::atomic::write(self.opts.dir.join("trace.json"), text.as_bytes())
    }
}

/// The run as `trace.json` records it: what a reader needs to redo a step (a prompt's stop
/// of −∞, "none", is written as null).
fn describe(o: &Options) -> serde_json::Value {
    let init = match &o.init {
        Init::RandomCodes => "random-codes".to_string(),
        Init::Image(_) => "image".to_string(),
        Init::Pixels => "pixels".to_string(),
        Init::Gradient => "gradient".to_string(),
        Init::Pool(p) => format!("pool:{}", p.len()),
        Init::Scenes(n) => format!("scenes:{n}"),
    };
    json!({
        "format": "vqclip generate trace 1",
        "tensors": {
            "z": "[1, E, h, w] latent the step starts from (coarse grid during a latent-grids phase)",
            "grad_z": "dL/dz of the step, before the optimiser",
            "image": "[3, H, W] decoded image in [0, 1]",
            "cutouts": "[cutn, 3, S, S] what CLIP sees, before its normalisation",
            "loss": "[] total loss",
            "prompt_losses": "[n_prompts] weighted loss of each prompt: text, image, noise",
        },
        "prompts": o.prompts.iter().map(|p| json!({
            "text": p.text, "weight": short(p.weight), "stop": short(p.stop),
        })).collect::<Vec<_>>(),
        "image_prompts": o.image_prompts.iter().map(|(_, _, _, p)| json!({
            "path": p.text, "weight": short(p.weight), "stop": short(p.stop),
        })).collect::<Vec<_>>(),
        "noise_prompts": o.noise_prompts.iter().map(|(seed, w)| json!({
            "seed": seed, "weight": short(*w),
        })).collect::<Vec<_>>(),
        "width": o.width,
        "height": o.height,
        "steps": o.steps,
        "seed": o.seed,
        "lr": short(o.lr),
        "optimizer": format!("{:?}", o.optimizer).to_lowercase(),
        "cutn": o.cutn,
        "cut_pow": short(o.cut_pow),
        "cut_method": format!("{:?}", o.cut_method).to_lowercase(),
        "noise": short(o.noise),
        "init": init,
        "init_weight": short(o.init_weight),
        "tv_weight": short(o.tv_weight),
        "latent_grids": o.latent_grids,
        "candidates": o.candidates,
        "candidate_steps": o.candidate_steps,
    })
}

/// `v` as JSON with the digits the user typed (0.1, not 0.10000000149011612); non-finite
/// values (a stop of −∞) as null.
fn short(v: f32) -> serde_json::Value {
    if !v.is_finite() {
        return serde_json::Value::Null;
    }
    v.to_string()
        .parse::<f64>()
        .map_or(serde_json::Value::Null, |x| json!(x))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn due_steps_are_zero_and_multiples_of_every() {
        let t = TraceOptions {
            dir: "x".into(),
            every: 3,
        };
        let due: Vec<usize> = (0..10).filter(|&s| t.due(s)).collect();
        assert_eq!(due, vec![0, 3, 6, 9]);
        assert_eq!(
            t.step_path(42),
            PathBuf::from("x").join("step00042.safetensors")
        );
        let zero = TraceOptions { every: 0, ..t };
        assert!(zero.check().unwrap_err().to_string().contains("at least 1"));
    }

    #[test]
    fn prepare_dir_refuses_files_and_makes_folders() {
        let d = tempfile::tempdir().unwrap();
        let file = d.path().join("f");
        std::fs::write(&file, b"x").unwrap();
        let e = prepare_dir(&file).unwrap_err().to_string();
        assert!(e.contains("is a file"), "{e}");
        let e = prepare_dir(&file.join("sub")).unwrap_err().to_string();
        assert!(e.contains("cannot create"), "{e}");
        let nested = d.path().join("a/b");
        prepare_dir(&nested).unwrap();
        assert!(nested.is_dir());
        // the writability probe leaves nothing behind
        assert_eq!(std::fs::read_dir(&nested).unwrap().count(), 0);
    }
}
