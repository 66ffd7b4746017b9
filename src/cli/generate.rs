//! `vqclip generate`: VQGAN+CLIP text-to-image.

use super::clip_args::ClipArgs;
use super::{values, DeviceArgs};
use anyhow::{bail, Context, Result};
use clap::Args;
use std::io::Write;
use std::path::PathBuf;
use vqclip::generate::cutouts::CutMethod;
pub(super) use vqclip::generate::fit::{check_fits, largest_tensor};
use vqclip::generate::output::{write_png, GifFrames};
use vqclip::generate::trace::{prepare_dir, TraceOptions, DEFAULT_TRACE_EVERY};
use vqclip::generate::{
    Explicit, Generation, Init, Options, Preset, Prompt, MAX_CUTN, MAX_INIT_SCENES,
};
use vqclip::models::clip::load_image;
use vqclip::models::vqgan::{config_beside, VqGan};
use vqclip::optim::Kind;

#[derive(Args, Debug)]
pub struct GenerateArgs {
    /// Prompts: "text[:weight[:stop]]", several separated by '|'; a negative weight pushes
    /// the image away from that prompt.
    #[arg(value_name = "PROMPTS")]
    prompts: Option<String>,
    /// Another prompt (repeatable), same syntax.
    #[arg(long = "prompt", value_name = "PROMPT")]
    more_prompts: Vec<String>,
    /// An image whose CLIP embedding to aim for: PATH[:weight[:stop]] (repeatable).
    #[arg(long = "image-prompt", value_name = "PATH[:W]")]
    image_prompts: Vec<String>,
    /// A random CLIP embedding to aim for: SEED[:weight] (repeatable).
    #[arg(long = "noise-prompt", value_name = "SEED[:W]")]
    noise_prompts: Vec<String>,
    #[command(flatten)]
    clip: ClipArgs,
    /// taming-transformers VQGAN weights (.ckpt or .safetensors) [default: the shipped
    /// weights/vqgan/shapes.safetensors, trained by vqclip on its shapes world].
    #[arg(long, value_name = "FILE", env = "VQCLIP_VQGAN")]
    vqgan: Option<PathBuf>,
    /// The VQGAN's .yaml config (default: the .yaml beside the weights).
    #[arg(long, value_name = "YAML")]
    config: Option<PathBuf>,
    /// Output size WxH, rounded down to a multiple of the VQGAN's downsampling factor
    /// [default: the VQGAN's training resolution, e.g. 256x256 for taming's models, 64x64
    /// for the shipped one].
    #[arg(long)]
    size: Option<String>,
    /// Defaults for steps, lr, cutn, cut-method, latent-grids, candidates, candidate-steps
    /// and init: reference (the notebook's: 100 steps, lr 0.1, 32 original cutouts, random
    /// codes), shapes (for the small shipped models, from random codes: 28 steps, lr 0.3, 6
    /// jitter views, latent grids 2,4,8,16, 3 starts of 2 steps; `shapes-codes` is its
    /// earlier name) or shapes-scenes (retrieval, not drawing: start from the best of 512
    /// shapes-world scenes as CLIP ranks them, then 10 steps at lr 0.01). Options given
    /// explicitly win [default: shapes with the shipped CLIP and VQGAN, else reference].
    #[arg(long)]
    preset: Option<String>,
    /// Optimisation steps (0 writes the initial image) [default: from --preset].
    #[arg(long)]
    steps: Option<usize>,
    /// Seed of every random choice (same seed, options and adapter: same bytes).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Learning rate, greater than 0 [default: from --preset].
    #[arg(long, value_parser = values::positive_f32)]
    lr: Option<f32>,
    /// Optimiser: adam or adamw.
    #[arg(long, default_value = "adam")]
    optimizer: String,
    /// Cutouts per step, 1 to 4096 [default: from --preset].
    #[arg(long, value_parser = cutn_value)]
    cutn: Option<usize>,
    /// Cutout size exponent (original method), 0 or more: larger favours small cutouts; 0
    /// makes every cutout the largest square (the whole image when it is square).
    #[arg(long, default_value_t = 1.0, value_parser = values::non_negative_f32)]
    cut_pow: f32,
    /// Cutout method: original (random crops, resampled), pooled (the whole image with flips, random affine and perspective warps, colour jitter and erasing) or jitter (the whole image zoomed by 0.9-1.2, shifted by up to 10%, blurred) [default: from --preset].
    #[arg(long)]
    cut_method: Option<String>,
    /// Noise added to cutouts, 0 or more (each cutout gets U(0, noise)·N(0, 1) per pixel).
    #[arg(long, default_value_t = 0.1, value_parser = values::non_negative_f32)]
    noise: f32,
    /// Start from this image (encoded by the VQGAN, resized to the output size).
    #[arg(long, value_name = "PATH")]
    init_image: Option<PathBuf>,
    /// Start from random-codes, pixels, gradient, or scenes:N (the best of N scenes of the
    /// shapes world, every one-shape combination of colours and kind first, as CLIP ranks
    /// them against the prompts, encoded; ignored with --init-image) [default: from --preset].
    #[arg(long)]
    init: Option<String>,
    /// Pull toward the initial latent: mse(z, z0) · weight / 2 (0 or more).
    #[arg(long, default_value_t = 0.0, value_parser = values::non_negative_f32)]
    init_weight: f32,
    /// Total-variation loss weight, 0 or more (smoother images).
    #[arg(long, default_value_t = 0.0, value_parser = values::non_negative_f32)]
    tv_weight: f32,
    /// Coarse-to-fine latent grids, e.g. 2,4,8: the steps are split evenly over them, and in
    /// each phase the latent is a G-cell grid (along its shorter side) upsampled bilinearly
    /// to the full latent, so the image is laid out in large regions first; 0 turns it off
    /// [default: from --preset].
    #[arg(long, value_name = "G,...", value_delimiter = ',')]
    latent_grids: Vec<usize>,
    /// Random starts to try (1: off): each gets --candidate-steps steps, then the one whose
    /// whole image is closest to the prompts goes on. The steps of all starts count toward
    /// --steps [default: from --preset].
    #[arg(long)]
    candidates: Option<usize>,
    /// Steps each of the --candidates starts gets before the choice [default: from --preset].
    #[arg(long)]
    candidate_steps: Option<usize>,
    /// Recompute decoder and CLIP blocks during the backward pass instead of keeping their
    /// activations: less GPU memory (larger images fit), about one more forward per step.
    #[arg(long)]
    recompute: bool,
    /// Save the image every N steps into --frames-dir (and into --gif).
    #[arg(long, value_name = "N")]
    save_every: Option<usize>,
    /// Folder for --save-every frames (default: OUT's name with "-frames").
    #[arg(long, value_name = "DIR")]
    frames_dir: Option<PathBuf>,
    /// Write an animated GIF of the progress.
    #[arg(long, value_name = "OUT.gif")]
    gif: Option<PathBuf>,
    /// Write one JSON object per step (step, loss, prompt_losses) to this file (it appears
    /// when the run succeeds; a failed run leaves none).
    #[arg(long, value_name = "FILE")]
    json_log: Option<PathBuf>,
    /// Write the loop's tensors into DIR (made if missing): DIR/step{n:05}.safetensors for
    /// step 0 and every --trace-every steps, with z, grad_z (dL/dz before the optimiser),
    /// image ([3,H,W] in [0,1]), cutouts ([cutn,3,S,S], before CLIP's normalisation), loss
    /// and prompt_losses; DIR/trace.json lists the options and the steps written.
    #[arg(long, value_name = "DIR")]
    trace: Option<PathBuf>,
    /// With --trace: trace step 0 and every N-th step, N at least 1.
    #[arg(long, value_name = "N", requires = "trace", default_value_t = DEFAULT_TRACE_EVERY,
          value_parser = values::at_least_one)]
    trace_every: usize,
    /// Output PNG.
    #[arg(short, long, value_name = "OUT.png")]
    output: PathBuf,
}

/// Parses `--cutn`: at least 1 and at most [`MAX_CUTN`].
pub(super) fn cutn_value(s: &str) -> std::result::Result<usize, String> {
    let n = values::at_least_one(s)?;
    if n > MAX_CUTN {
        return Err(format!(
            "{n} cutouts per step is more than the {MAX_CUTN} allowed"
        ));
    }
    Ok(n)
}

/// Parses `--init`.
fn parse_init(s: &str) -> Result<Init> {
    Ok(match s {
        "random-codes" => Init::RandomCodes,
        "pixels" => Init::Pixels,
        "gradient" => Init::Gradient,
        o => match o.strip_prefix("scenes:") {
            Some(n) => match n.parse::<usize>() {
                Ok(n) if n > MAX_INIT_SCENES => bail!(
                    "--init '{o}': at most {MAX_INIT_SCENES} scenes (each is rendered and \
                     ranked by CLIP before the first step)"
                ),
                Ok(n) if n > 0 => Init::Scenes(n),
                _ => bail!("--init '{o}': scenes:N needs a whole number N of at least 1"),
            },
            None => {
                bail!("unknown --init '{o}': expected random-codes, pixels, gradient or scenes:N")
            }
        },
    })
}

/// Longest side `--size` accepts: PNG and the image crate store sides as u32, and a side
/// this long already needs far more memory than any device has.
const MAX_SIDE: usize = 1 << 16;

/// Parses `--size WxH`: both sides positive and at most [`MAX_SIDE`], so that every
/// product of them with channels, batch and element size fits a u64.
pub(super) fn parse_size(s: &str) -> Result<(usize, usize)> {
    let (w, h) = s
        .split_once(['x', 'X'])
        .with_context(|| format!("--size '{s}' is not WxH (e.g. 256x256)"))?;
    let w: usize = w
        .trim()
        .parse()
        .with_context(|| format!("--size '{s}': bad width"))?;
    let h: usize = h
        .trim()
        .parse()
        .with_context(|| format!("--size '{s}': bad height"))?;
    if w == 0 || h == 0 {
        bail!("--size '{s}': width and height must be positive");
    }
    if w > MAX_SIDE || h > MAX_SIDE {
        bail!("--size '{s}' is too large: each side may be at most {MAX_SIDE} pixels");
    }
    Ok((w, h))
}

/// Image pixels `[3, H, W]` in [0, 1] of `path` resized to `w`×`h`.
fn load_resized(path: &PathBuf, w: usize, h: usize) -> Result<Vec<f32>> {
    let img = load_image(path)?;
    let img = image::imageops::resize(
        &img,
        w as u32,
        h as u32,
        image::imageops::FilterType::Lanczos3,
    );
    let mut out = vec![0.0f32; 3 * w * h];
    for (x, y, p) in img.enumerate_pixels() {
        for c in 0..3 {
            out[(c * h + y as usize) * w + x as usize] = p.0[c] as f32 / 255.0;
        }
    }
    Ok(out)
}

pub fn run(dev: &DeviceArgs, a: GenerateArgs) -> Result<()> {
    let mut prompts = Vec::new();
    if let Some(p) = &a.prompts {
        prompts.extend(Prompt::parse_list(p)?);
    }
    for p in &a.more_prompts {
        prompts.extend(Prompt::parse_list(p)?);
    }
    for ip in &a.image_prompts {
        // Its weight and stop are checked now, before the models load; the image later.
        Prompt::parse(ip).with_context(|| format!("--image-prompt '{ip}'"))?;
    }
    let size = a.size.as_deref().map(parse_size).transpose()?;
    let optimizer = match a.optimizer.as_str() {
        "adam" => Kind::Adam,
        "adamw" => Kind::AdamW,
        o => bail!("unknown --optimizer '{o}': expected adam or adamw"),
    };
    let preset: Preset = match &a.preset {
        Some(p) => p.parse()?,
        None => Preset::default_for(a.clip.clip.is_none() && a.vqgan.is_none()),
    };
    let defaults = Options::new(Vec::new(), 1, 1).with_preset(preset);
    let steps = a.steps.unwrap_or(defaults.steps);
    let lr = a.lr.unwrap_or(defaults.lr);
    let cutn = a.cutn.unwrap_or(defaults.cutn);
    let cut_method: CutMethod = match &a.cut_method {
        Some(m) => m.parse()?,
        None => defaults.cut_method,
    };
    let latent_grids = match a.latent_grids.as_slice() {
        [] => defaults.latent_grids.clone(),
        [0] => Vec::new(),
        g => g.to_vec(),
    };
    let candidates = a.candidates.unwrap_or(defaults.candidates);
    let candidate_steps = a.candidate_steps.unwrap_or(defaults.candidate_steps);
    if cutn == 0 {
        bail!("--cutn must be at least 1");
    }
    if a.save_every == Some(0) {
        bail!("--save-every must be at least 1");
    }
    if !(lr > 0.0 && lr.is_finite()) {
        bail!("--lr must be a positive number");
    }
    let noise_prompts = a
        .noise_prompts
        .iter()
        .map(|np| vqclip::generate::prompt::parse_noise(np))
        .collect::<Result<Vec<_>, _>>()?;
    if prompts.is_empty() && a.image_prompts.is_empty() && noise_prompts.is_empty() {
        bail!("no prompt: give PROMPTS, --prompt, --image-prompt or --noise-prompt");
    }
    let trace = a.trace.as_ref().map(|dir| TraceOptions {
        dir: dir.clone(),
        every: a.trace_every,
    });
    if let Some(t) = &trace {
        // Before the models load: a bad folder is refused before any work.
        prepare_dir(&t.dir)?;
    }
    let vq_path = &vqclip::weights::shipped::vqgan_file_or(a.vqgan.as_deref())?;
    let config_path = match (&a.config, config_beside(vq_path)) {
        (Some(c), _) => c.clone(),
        (None, Some(c)) => c,
        (None, None) => bail!(
            "no config for {}: pass --config YAML (the taming .yaml the model was trained with)",
            vq_path.display()
        ),
    };
    let clip = a.clip.load(dev)?;
    let gpu = clip.gpu().clone();
    let vqgan = VqGan::load(vq_path, &config_path, &gpu)
        .with_context(|| format!("cannot load the VQGAN {}", vq_path.display()))?;
    let f = vqgan.downsampling_factor();
    let (w0, h0) = size.unwrap_or((vqgan.config.dd.resolution, vqgan.config.dd.resolution));
    let (w, h) = (w0 / f * f, h0 / f * f);
    if w == 0 || h == 0 {
        bail!("--size {w0}x{h0} is smaller than the VQGAN's downsampling factor {f}");
    }
    if (w, h) != (w0, h0) {
        eprintln!(
            "note: size {w0}x{h0} rounded down to {w}x{h} (a multiple of the VQGAN factor {f})"
        );
    }
    check_fits(
        &gpu,
        &vqgan.config,
        &clip.config.vision,
        (w, h),
        cutn,
        a.recompute,
    )?;
    // The preset's latent grids and random starts adapt to a smaller latent or fewer steps;
    // explicit values are checked as given (by `Generation::new`).
    let short = (w / f).min(h / f);
    let mut opts = Options::new(prompts.clone(), w, h);
    opts.steps = steps;
    opts.seed = a.seed;
    opts.lr = lr;
    opts.optimizer = optimizer;
    opts.cutn = cutn;
    opts.cut_pow = a.cut_pow;
    opts.cut_method = cut_method;
    opts.noise = a.noise;
    opts.init_weight = a.init_weight;
    opts.tv_weight = a.tv_weight;
    opts.recompute = a.recompute;
    opts.latent_grids = latent_grids;
    opts.candidates = candidates;
    opts.candidate_steps = candidate_steps;
    opts.noise_prompts = noise_prompts;
    opts.trace = trace;
    opts.init = match (&a.init_image, a.init.as_deref()) {
        (Some(p), _) => Init::Image(
            load_resized(p, w, h).with_context(|| format!("--init-image {}", p.display()))?,
        ),
        (None, None) => defaults.init.clone(),
        (None, Some(i)) => parse_init(i)?,
    };
    opts.adapt_preset(
        short,
        Explicit {
            latent_grids: !a.latent_grids.is_empty(),
            candidates: a.candidates.is_some(),
            candidate_steps: a.candidate_steps.is_some(),
        },
    );
    let grids = match opts.latent_grids.as_slice() {
        [] => "the full latent".to_string(),
        g => format!("latent grids {g:?}"),
    };
    eprintln!(
        "{} preset: {steps} steps, lr {lr}, {cutn} {} views, {grids}, from {}, {} start(s)",
        preset.name(),
        format!("{cut_method:?}").to_lowercase(),
        opts.init.describe(),
        opts.candidates,
    );
    for ip in &a.image_prompts {
        // PATH[:weight[:stop]]: the trailing numeric fields are parsed like a text prompt's.
        let pr = Prompt::parse(ip)?;
        let path = PathBuf::from(&pr.text);
        let px = load_resized(&path, w, h)
            .with_context(|| format!("--image-prompt {}", path.display()))?;
        opts.image_prompts.push((px, w, h, pr));
    }
    let opts_candidates = opts.candidates;
    let mut gen = Generation::new(&gpu, &clip, &vqgan, opts)?;
    let mut log = match &a.json_log {
        // Written to a temporary file and renamed once the run succeeds: a failed or
        // killed run leaves no partial log under the name.
        Some(p) => Some(
            vqclip::atomic::AtomicFile::create(p)
                .with_context(|| format!("cannot create {}", p.display()))?,
        ),
        None => None,
    };
    let frames_dir = a.save_every.map(|_| {
        a.frames_dir.clone().unwrap_or_else(|| {
            let stem = a
                .output
                .file_stem()
                .map_or("out".into(), |s| s.to_string_lossy().into_owned());
            a.output.with_file_name(format!("{stem}-frames"))
        })
    });
    if let Some(d) = &frames_dir {
        std::fs::create_dir_all(d).with_context(|| format!("cannot create {}", d.display()))?;
    }
    let mut gif = match &a.gif {
        Some(p) => Some(GifFrames::create(p, w, h)?),
        None => None,
    };
    let gif_every = a.save_every.unwrap_or((steps / 50).max(1));
    let texts: Vec<(&str, String)> = vec![
        (
            "prompt",
            prompts
                .iter()
                .map(|p| format!("{}:{}", p.text, p.weight))
                .collect::<Vec<_>>()
                .join(" | "),
        ),
        ("seed", a.seed.to_string()),
        ("steps", steps.to_string()),
        ("size", format!("{w}x{h}")),
        (
            "clip",
            a.clip
                .dir()
                .map_or(String::new(), |p| p.display().to_string()),
        ),
        ("vqgan", vq_path.display().to_string()),
        (
            "precision",
            format!("{:?}", a.clip.precision).to_lowercase(),
        ),
        ("software", format!("vqclip {}", vqclip::VERSION)),
    ];
    let bar = indicatif::ProgressBar::new(steps as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{bar:30} {pos}/{len} steps  {msg}  {per_sec}  eta {eta}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    if let Some(g) = gif.as_mut() {
        g.push(&gen.image_rgb8()?)?;
    }
    for step in 0..steps {
        let l = gen.step()?;
        let tried = gen.candidate_losses().len();
        if opts_candidates > 1 && tried < opts_candidates {
            bar.set_message(format!(
                "start {}/{opts_candidates}  loss {:.4}",
                tried + 1,
                l.loss
            ));
        } else {
            bar.set_message(format!("loss {:.4}", l.loss));
        }
        bar.inc(1);
        if let Some(f) = log.as_mut() {
            writeln!(f, "{}", serde_json::to_string(&l)?)?;
        }
        let done = step + 1;
        let save = a.save_every.is_some_and(|n| done % n == 0);
        if save || (gif.is_some() && done % gif_every == 0) {
            let rgb = gen.image_rgb8()?;
            if let (true, Some(d)) = (save, &frames_dir) {
                write_png(&d.join(format!("frame_{done:05}.png")), w, h, &rgb, &texts)?;
            }
            if let Some(g) = gif.as_mut() {
                g.push(&rgb)?;
            }
        }
    }
    bar.finish();
    let pool = gen.pool_losses();
    if !pool.is_empty() {
        let mut sorted = pool.to_vec();
        sorted.sort_by(f32::total_cmp);
        eprintln!(
            "start: the best of {} scenes by CLIP (whole-image loss {:.3}; median {:.3})",
            pool.len(),
            sorted[0],
            sorted[sorted.len() / 2]
        );
    }
    let tried = gen.candidate_losses();
    if !tried.is_empty() {
        let best = (0..tried.len())
            .min_by(|&i, &j| tried[i].total_cmp(&tried[j]))
            .unwrap_or(0);
        let list: Vec<String> = tried.iter().map(|l| format!("{l:.3}")).collect();
        eprintln!(
            "tried {} starts (whole-image loss {}), kept start {}",
            tried.len(),
            list.join(", "),
            best + 1
        );
    }
    let rgb = gen.image_rgb8()?;
    write_png(&a.output, w, h, &rgb, &texts)?;
    if let Some(g) = gif {
        g.finish()?;
    }
    if let Some(f) = log {
        f.commit()?;
    }
    eprintln!("wrote {} ({w}x{h}, {} steps)", a.output.display(), steps);
    Ok(())
}
