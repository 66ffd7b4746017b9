#!/usr/bin/env python3
"""Regenerates tests/fixtures/trace/NAME.safetensors: step 0 of `vqclip generate --trace`
recomputed in PyTorch, for every run listed in tests/fixtures/trace/runs.json.

    cargo build --release
    /work/pyenv/bin/python tools/make_trace_fixtures.py [path/to/vqclip]

For each run the script
1. runs `vqclip generate ARGS --trace DIR --trace-every 1` (ARGS from runs.json) and reads
   vqclip's `DIR/step00000.safetensors` (the latent `z` step 0 starts from) and
   `DIR/trace.json` (the prompts, weights and stops);
2. recomputes step 0 from that same z with the reference code paths: taming-transformers'
   `Decoder` (+ `post_quant_conv`) and codebook loaded from the run's .ckpt/.yaml,
   transformers' `CLIPModel` (float32, eager attention) and `CLIPTokenizer` from the run's
   CLIP folder, and the VQGAN+CLIP loop of nerdyrodent/VQGAN-CLIP `generate.py` (see
   ../shared/docs/MODEL_FACTS.md part C): `vector_quantize` with `ReplaceGrad`
   (straight-through), `synth = ClampWithGrad((decode(z_q) + 1) / 2, 0, 1)`, the original
   `MakeCutouts` (one cut of size int(rand^0 · (max − min) + min) = the whole square image at
   CLIP's input size, `resample` = bicubic interpolation to the same size, then
   `ClampWithGrad`), no noise, CLIP normalisation, `encode_image`, and each `Prompt`'s
   `|w| · replace_grad(d, max(d, stop)).mean()` with `d = sign(w) · 2·asin(‖a − b‖/2)²`,
   summed; then autograd for dL/dz;
3. writes tests/fixtures/trace/NAME.safetensors: `z` (the input, vqclip's), `grad_z`,
   `image` [3, H, W], `cutouts` [1, 3, S, S], `loss` [] and `prompt_losses` [n].

tests/trace.rs runs the same ARGS again and compares vqclip's step 0 with these goldens
(loss within 1e-4 relative, grad_z within 1e-3 of its largest |entry|). With a latent that is
not already a codebook entry (`--init pixels`), the smallest gap between the nearest and the
second-nearest code is checked, so that f32 rounding cannot flip a code between the two sides.
"""
import json
import os
import subprocess
import sys
import tempfile
import types

import torch
import torch.nn as nn
import torch.nn.functional as F
import yaml
from safetensors.torch import load_file, save_file
from transformers import CLIPModel, CLIPTokenizer

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
OUT = os.path.join(ROOT, "tests", "fixtures", "trace")
# Smallest allowed gap (squared-distance units) between a latent's nearest and second-nearest
# code: far above the f32 rounding of the distances (~1e-6 here).
MARGIN = 1e-3

# The fixture .ckpt files pickle a Lightning callback class (tools/make_vqgan_fixtures.py):
# a module of that name lets torch.load rebuild it without Lightning.
_pl = types.ModuleType("pytorch_lightning.callbacks.model_checkpoint")


class ModelCheckpoint:  # noqa: D101 - placeholder class, only its name is pickled
    pass


ModelCheckpoint.__module__ = _pl.__name__
_pl.ModelCheckpoint = ModelCheckpoint
sys.modules.setdefault(_pl.__name__, _pl)

from taming.modules.diffusionmodules.model import Decoder  # noqa: E402


# --- nerdyrodent/VQGAN-CLIP generate.py ----------------------------------------------------


class ReplaceGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_forward, x_backward):
        ctx.shape = x_backward.shape
        return x_forward

    @staticmethod
    def backward(ctx, grad_in):
        return None, grad_in.sum_to_size(ctx.shape)


replace_grad = ReplaceGrad.apply


class ClampWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input, min, max):
        ctx.min = min
        ctx.max = max
        ctx.save_for_backward(input)
        return input.clamp(min, max)

    @staticmethod
    def backward(ctx, grad_in):
        input, = ctx.saved_tensors
        return grad_in * (grad_in * (input - input.clamp(ctx.min, ctx.max)) >= 0), None, None


clamp_with_grad = ClampWithGrad.apply


def vector_quantize(x, codebook):
    d = x.pow(2).sum(dim=-1, keepdim=True) + codebook.pow(2).sum(dim=1) - 2 * x @ codebook.T
    indices = d.argmin(-1)
    x_q = F.one_hot(indices, codebook.shape[0]).to(d.dtype) @ codebook
    return replace_grad(x_q, x), d


def prompt_loss(embed_in, target, weight, stop):
    input_normed = F.normalize(embed_in.unsqueeze(1), dim=2)
    embed_normed = F.normalize(target.unsqueeze(0), dim=2)
    dists = input_normed.sub(embed_normed).norm(dim=2).div(2).arcsin().pow(2).mul(2)
    dists = dists * torch.sign(torch.tensor(weight))
    stop = torch.tensor(stop)
    return abs(weight) * replace_grad(dists, torch.maximum(dists, stop)).mean()


def make_cutouts_original(img, cut_size, cutn, cut_pow):
    """MakeCutouts (original) for the one case the fixtures use: cut_pow 0, so
    `rand ** 0 == 1` and every cut is the largest square; the image is square, so its offset
    is 0 and the cut is the whole image."""
    side_y, side_x = img.shape[2:4]
    max_size = min(side_x, side_y)
    min_size = min(side_x, side_y, cut_size)
    assert cut_pow == 0 and side_x == side_y, "only whole-image cuts are reproduced here"
    cutouts = []
    for _ in range(cutn):
        size = int(1.0 * (max_size - min_size) + min_size)
        cutout = img[:, :, 0:size, 0:size]
        # resample: the Lanczos prefilter runs only when shrinking; then bicubic to cut_size
        assert size == cut_size, "the image side must be CLIP's input size"
        cutouts.append(F.interpolate(cutout, (cut_size, cut_size), mode="bicubic",
                                     align_corners=True))
    return clamp_with_grad(torch.cat(cutouts, dim=0), 0, 1)


# --- models --------------------------------------------------------------------------------


class TamingDecoder(nn.Module):
    """The decoding half of taming.models.vqgan.VQModel: same attribute names, so the same
    state_dict keys (post_quant_conv.*, decoder.*, quantize.embedding.weight)."""

    def __init__(self, cfg):
        super().__init__()
        p = cfg["model"]["params"]
        dd = p["ddconfig"]
        self.decoder = Decoder(**dd)
        self.post_quant_conv = nn.Conv2d(p["embed_dim"], dd["z_channels"], 1)
        self.codebook = nn.Parameter(torch.zeros(p["n_embed"], p["embed_dim"]))

    def load(self, state_dict):
        sd = {k: v.float() for k, v in state_dict.items()
              if k.startswith(("decoder.", "post_quant_conv."))}
        sd["codebook"] = state_dict["quantize.embedding.weight"].float()
        self.load_state_dict(sd, strict=True)

    def decode(self, z_q):
        return self.decoder(self.post_quant_conv(z_q))


def load_vqgan(ckpt_path):
    cfg = yaml.safe_load(open(os.path.splitext(ckpt_path)[0] + ".yaml"))
    model = TamingDecoder(cfg).eval().requires_grad_(False)
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    model.load(ckpt["state_dict"])
    return model


def arg(args, name):
    return args[args.index(name) + 1]


def step0(run, vqclip):
    """vqclip's step 0 of `run` and its PyTorch recomputation."""
    args = run["args"]
    with tempfile.TemporaryDirectory() as tmp:
        trace = os.path.join(tmp, "trace")
        subprocess.run([vqclip, "generate", *args, "--trace", trace, "--trace-every", "1",
                        "-o", os.path.join(tmp, "out.png")], check=True, cwd=ROOT)
        ours = load_file(os.path.join(trace, "step00000.safetensors"))
        meta = json.load(open(os.path.join(trace, "trace.json")))
    clip_dir = os.path.join(ROOT, arg(args, "--clip"))
    vq = load_vqgan(os.path.join(ROOT, arg(args, "--vqgan")))
    clip = CLIPModel.from_pretrained(clip_dir, dtype=torch.float32,
                                     attn_implementation="eager").eval().requires_grad_(False)
    tok = CLIPTokenizer.from_pretrained(clip_dir)
    pre = json.load(open(os.path.join(clip_dir, "preprocessor_config.json")))
    mean = torch.tensor(pre["image_mean"]).view(1, 3, 1, 1)
    std = torch.tensor(pre["image_std"]).view(1, 3, 1, 1)
    cut_size = clip.config.vision_config.image_size

    z = ours["z"].clone().double().float().requires_grad_(True)
    x = z.movedim(1, 3)
    x_q, d = vector_quantize(x, vq.codebook)
    top2 = d.detach().topk(2, dim=-1, largest=False).values
    margin = float((top2[..., 1] - top2[..., 0]).min())
    assert margin > MARGIN, f"{run['name']}: two codes are {margin:.2e} apart: pick another seed"
    z_q = x_q.movedim(3, 1)
    img = clamp_with_grad(vq.decode(z_q).add(1).div(2), 0, 1)
    cutouts = make_cutouts_original(img, cut_size, meta["cutn"], meta["cut_pow"])
    assert meta["noise"] == 0, "the fixtures add no noise"
    embed = clip.get_image_features(pixel_values=(cutouts - mean) / std)
    if not torch.is_tensor(embed):  # transformers 5 returns an output object
        embed = embed.pooler_output
    losses = []
    for p in meta["prompts"]:
        ids = tok([p["text"]], return_tensors="pt", padding=True)
        with torch.no_grad():
            t = clip.get_text_features(**ids)
            if not torch.is_tensor(t):
                t = t.pooler_output
        stop = -float("inf") if p["stop"] is None else p["stop"]
        losses.append(prompt_loss(embed, t, p["weight"], stop))
    assert not meta["image_prompts"] and not meta["noise_prompts"]
    loss = sum(losses)
    loss.backward()
    golden = {
        "z": ours["z"].contiguous(),
        "grad_z": z.grad.detach().contiguous(),
        "image": img.detach()[0].contiguous(),
        "cutouts": cutouts.detach().contiguous(),
        "loss": loss.detach().reshape([]).contiguous(),
        "prompt_losses": torch.stack([x.detach() for x in losses]).contiguous(),
    }
    return ours, golden, margin


def main():
    vqclip = sys.argv[1] if len(sys.argv) > 1 else os.path.join(ROOT, "target", "release",
                                                                  "vqclip")
    vqclip = os.path.abspath(vqclip)
    runs = json.load(open(os.path.join(OUT, "runs.json")))["runs"]
    for run in runs:
        ours, golden, margin = step0(run, vqclip)
        g = golden["grad_z"]
        gerr = float((ours["grad_z"] - g).abs().max() / g.abs().max())
        lerr = float(abs(ours["loss"] - golden["loss"]) / abs(golden["loss"]))
        ierr = float((ours["image"] - golden["image"]).abs().max())
        print(f"{run['name']}: loss {float(golden['loss']):.6f} (vqclip rel diff {lerr:.2e}), "
              f"grad_z max |g| {float(g.abs().max()):.3e} (vqclip diff / max {gerr:.2e}), "
              f"image max diff {ierr:.2e}, code margin {margin:.2e}")
        meta = {"args": json.dumps(run["args"]), "torch": torch.__version__,
                "code_margin": f"{margin:.3e}"}
        save_file(golden, os.path.join(OUT, run["name"] + ".safetensors"), metadata=meta)


if __name__ == "__main__":
    main()
