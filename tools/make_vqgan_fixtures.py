#!/usr/bin/env python3
"""Regenerates tests/fixtures/vqgan/: small random VQGANs of the real taming-transformers
architecture, saved the way taming saves them (Lightning .ckpt + .yaml), with golden outputs
computed by taming-transformers itself.

    /work/pyenv/bin/pip install taming-transformers-rom1504 einops
    /work/pyenv/bin/python tools/make_vqgan_fixtures.py

Only the taming modules the model needs are imported (Encoder, Decoder, VectorQuantizer2,
GumbelQuantize); nothing here imports pytorch_lightning. The checkpoints mimic a Lightning
checkpoint: `state_dict` (model + some `loss.*` keys), `optimizer_states`, `lr_schedulers`,
`callbacks` keyed by a callback class, a numpy scalar, epoch / global_step.

Files per model NAME:
  NAME.ckpt, NAME.yaml   the checkpoint and its taming config
  NAME.json              goldens: input (float [1,3,H,W] = png/127.5-1), h (encoder output after
                         quant_conv, pre-quantisation), codes ([h][w] grid), z_q, decoded
                         ([1,3,H,W] floats, decoder output, not clamped), recon_png_sha-free
                         pixels (round(clamp((x+1)/2)*255)), and the smallest code margin.
  input.png              the shared input image (H=32, W=48)
Other files:
  tensors.ckpt/.json     a plain (non-Lightning) state dict with f16/bf16/f64/i64 tensors,
                         non-contiguous views and a storage shared by two tensors
  malicious.ckpt         a torch zip whose pickle calls posix.system on load: a reader must
                         refuse it (the payload would create /tmp/vqclip-pickle-pwned)
"""
import json
import os
import sys
import types

import numpy as np
import torch
import torch.nn as nn
import yaml
from PIL import Image

from taming.modules.diffusionmodules.model import Decoder, Encoder
from taming.modules.vqvae.quantize import GumbelQuantize, VectorQuantizer2

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures", "vqgan")
PWNED = "/tmp/vqclip-pickle-pwned"
# Smallest allowed gap between the best and second-best code (distance or logit units, with z
# scaled to unit spread): far above f32 rounding of the encoder (~1e-5).
MARGIN = 2e-3

# A stand-in for pytorch_lightning's ModelCheckpoint: Lightning 1.x keys `callbacks` by the
# callback's class, so a real checkpoint holds a GLOBAL naming it. A fake module gives the
# same pickle bytes without importing Lightning.
_pl = types.ModuleType("pytorch_lightning.callbacks.model_checkpoint")


class ModelCheckpoint:  # noqa: D101 - placeholder class, only its name is pickled
    pass


ModelCheckpoint.__module__ = _pl.__name__
_pl.ModelCheckpoint = ModelCheckpoint
sys.modules[_pl.__name__] = _pl


class VQModel(nn.Module):
    """taming.models.vqgan.VQModel without the Lightning parts: same attribute names, so the
    same state_dict keys."""

    def __init__(self, ddconfig, n_embed, embed_dim, gumbel=False):
        super().__init__()
        self.encoder = Encoder(**ddconfig)
        self.decoder = Decoder(**ddconfig)
        if gumbel:
            self.quantize = GumbelQuantize(ddconfig["z_channels"], embed_dim, n_embed=n_embed,
                                           kl_weight=1e-8, temp_init=1.0)
        else:
            self.quantize = VectorQuantizer2(n_embed, embed_dim, beta=0.25)
        self.quant_conv = nn.Conv2d(ddconfig["z_channels"], embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(embed_dim, ddconfig["z_channels"], 1)
        self.gumbel = gumbel


def perturb(model, gen):
    """Non-trivial GroupNorm affine params and biases so that a skipped term shows."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith(".weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
            elif name.endswith(".bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))


def make_image(h, w, seed):
    """A smooth random colour image (sums of a few sinusoids) so that codes vary spatially."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    img = np.zeros((h, w, 3))
    for c in range(3):
        for _ in range(4):
            fy, fx, ph = rng.uniform(0.05, 0.5), rng.uniform(0.05, 0.5), rng.uniform(0, 6.3)
            img[..., c] += np.sin(fy * yy + fx * xx + ph)
    img = (img - img.min()) / (img.max() - img.min())
    return (img * 255).round().astype(np.uint8)


def flat(t):
    return [float(v) for v in t.detach().reshape(-1).tolist()]


def lightning_ckpt(state_dict, model, gen):
    """The layout PyTorch Lightning writes, with the optimizer states kept small."""
    names = list(state_dict)[:3]
    opt_state = {
        i: {
            "step": torch.tensor(1000.0),
            "exp_avg": 0.01 * torch.randn(state_dict[n].shape, generator=gen),
            "exp_avg_sq": 0.001 * torch.rand(state_dict[n].shape, generator=gen),
        }
        for i, n in enumerate(names)
    }
    return {
        "epoch": 3,
        "global_step": 1000,
        "pytorch-lightning_version": "1.0.8",
        "state_dict": state_dict,
        "optimizer_states": [
            {
                "state": opt_state,
                "param_groups": [{
                    "lr": 4.5e-6, "betas": (0.5, 0.9), "eps": 1e-8, "weight_decay": 0,
                    "amsgrad": False, "params": list(range(len(names))),
                }],
            }
        ],
        "lr_schedulers": [],
        "callbacks": {
            ModelCheckpoint: {
                "monitor": "val/rec_loss",
                "best_model_score": np.float64(0.125),
                "best_model_path": "logs/checkpoints/last.ckpt",
            }
        },
    }


def loss_keys(gen):
    """A few `loss.*` keys like the discriminator's (BatchNorm buffers included)."""
    return {
        "loss.discriminator.main.0.weight": torch.randn(8, 3, 4, 4, generator=gen),
        "loss.discriminator.main.0.bias": torch.randn(8, generator=gen),
        "loss.discriminator.main.3.running_mean": torch.zeros(8),
        "loss.discriminator.main.3.running_var": torch.ones(8),
        "loss.discriminator.main.3.num_batches_tracked": torch.tensor(1000, dtype=torch.int64),
        "loss.perceptual_loss.scaling_layer.shift": torch.tensor([-0.03, -0.088, -0.188])[None, :, None, None],
    }


def config_yaml(ddconfig, n_embed, embed_dim, gumbel):
    params = {
        "embed_dim": embed_dim,
        "n_embed": n_embed,
        "ddconfig": ddconfig,
        "lossconfig": {
            "target": "taming.modules.losses.vqperceptual.VQLPIPSWithDiscriminator",
            "params": {"disc_conditional": False, "disc_in_channels": 3, "disc_start": 0,
                       "disc_weight": 0.75, "disc_num_layers": 2, "codebook_weight": 1.0},
        },
    }
    if gumbel:
        params["kl_weight"] = 1.0e-08
        params["temperature_scheduler_config"] = {
            "target": "taming.lr_scheduler.LambdaWarmUpCosineScheduler",
            "params": {"warm_up_steps": 0, "max_decay_steps": 1000001, "lr_start": 0.9,
                       "lr_max": 0.9, "lr_min": 1.0e-06},
        }
    else:
        params["monitor"] = "val/rec_loss"
    return {
        "model": {
            "base_learning_rate": 4.5e-06,
            "target": "taming.models.vqgan.GumbelVQ" if gumbel else "taming.models.vqgan.VQModel",
            "params": params,
        }
    }


def build(name, ddconfig, n_embed, embed_dim, seed, img, gumbel=False, views=False):
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed + 1)
    model = VQModel(ddconfig, n_embed, embed_dim, gumbel).eval()
    perturb(model, gen)
    x = torch.from_numpy(img).permute(2, 0, 1)[None].float() / 127.5 - 1.0
    with torch.no_grad():
        # Rescale quant_conv so that z has unit spread: code distances are then O(1) and the
        # margin check below is meaningful.
        std = float(model.quant_conv(model.encoder(x)).std())
        model.quant_conv.weight /= std
        model.quant_conv.bias /= std
        h = model.quant_conv(model.encoder(x))
        zc = h.permute(0, 2, 3, 1).reshape(-1, h.shape[1])
        # Retry codebooks until no position is within MARGIN of a tie, so that f32 rounding
        # differences cannot flip a code and the test can demand exact agreement.
        for attempt in range(200):
            if gumbel:
                # Eval path without the Gumbel noise: the most likely code (argmax of the
                # logits), then the codebook row. (taming's forward samples
                # gumbel_softmax(hard=True) even in eval; its noise-free mode is this argmax.)
                model.quantize.proj.weight.copy_(
                    torch.randn(model.quantize.proj.weight.shape, generator=gen) / embed_dim ** 0.5)
                logits = model.quantize.proj(h)
                lg = logits.permute(0, 2, 3, 1).reshape(-1, n_embed)
                top2 = lg.topk(2, dim=1).values
                margin = float((top2[:, 0] - top2[:, 1]).min())
                codes = lg.argmax(dim=1)
                zq = model.quantize.embed.weight[codes]
            else:
                # A codebook on the scale of z (taming's init is uniform(-1/n, 1/n)).
                model.quantize.embedding.weight.copy_(torch.randn(n_embed, embed_dim, generator=gen))
                zq_t, _, (_, _, codes) = model.quantize(h)
                e = model.quantize.embedding.weight
                d = (zc ** 2).sum(1, keepdim=True) + (e ** 2).sum(1) - 2 * zc @ e.t()
                top2 = d.topk(2, dim=1, largest=False).values
                margin = float((top2[:, 1] - top2[:, 0]).min())
                assert torch.equal(codes, d.argmin(1))
                zq = e[codes]
                assert torch.allclose(zq_t.permute(0, 2, 3, 1).reshape(-1, embed_dim), zq, atol=1e-6)
            if margin > MARGIN:
                break
        else:
            raise SystemExit(f"{name}: no codebook without near-ties found; change the seed")
        hh, ww = h.shape[2], h.shape[3]
        zq = zq.reshape(1, hh, ww, embed_dim).permute(0, 3, 1, 2)
        dec = model.decoder(model.post_quant_conv(zq))
    print(f"{name}: h {tuple(h.shape)} codes used {codes.unique().numel()}/{n_embed} "
          f"min margin {margin:.3g} decoded range [{dec.min():.3f}, {dec.max():.3f}]")

    sd = dict(model.state_dict())
    if views:
        # Store two weights as non-contiguous views / offsets into larger storages, as a
        # checkpoint of sliced or transposed parameters would be.
        w = sd["quant_conv.weight"]
        big = torch.zeros(w.shape[1], w.shape[0] + 3)
        big[:, 2:2 + w.shape[0]] = w[:, :, 0, 0].t()
        sd["quant_conv.weight"] = big[:, 2:2 + w.shape[0]].t()[:, :, None, None]
        assert not sd["quant_conv.weight"].is_contiguous()
        assert torch.equal(sd["quant_conv.weight"], w)
        e = sd["quantize.embedding.weight"]
        store = torch.randn(e.shape[0] + 1, e.shape[1], generator=gen)
        store[1:] = e
        sd["quantize.embedding.weight"] = store[1:]
        assert sd["quantize.embedding.weight"].storage_offset() == e.shape[1]
    sd.update(loss_keys(gen))
    torch.save(lightning_ckpt(sd, model, gen), os.path.join(OUT, f"{name}.ckpt"))
    with open(os.path.join(OUT, f"{name}.yaml"), "w") as f:
        yaml.safe_dump(config_yaml(ddconfig, n_embed, embed_dim, gumbel), f, sort_keys=False)
    pixels = ((dec.clamp(-1, 1) + 1) / 2 * 255).round().clamp(0, 255)  # == round(clamp((x+1)/2,0,1)*255)
    golden = {
        "model": name,
        "gumbel": gumbel,
        "input_shape": list(x.shape),
        "input": flat(x),
        "h_shape": list(h.shape),
        "h": flat(h),
        "codes": codes.reshape(hh, ww).tolist(),
        "min_code_margin": margin,
        "z_q": flat(zq),
        "decoded_shape": list(dec.shape),
        "decoded": flat(dec),
        "pixels": [int(v) for v in pixels.reshape(-1).tolist()],
    }
    with open(os.path.join(OUT, f"{name}.json"), "w") as f:
        json.dump(golden, f, separators=(",", ":"))


def tensors_fixture():
    """A plain state dict (no Lightning wrapper) covering dtypes and views."""
    gen = torch.Generator().manual_seed(7)
    base = torch.randn(4, 6, generator=gen)
    shared = torch.arange(24, dtype=torch.float32)
    sd = {
        "f32": base,
        "f16": base.half(),
        "bf16": base.bfloat16(),
        "f64": base.double(),
        "i64": torch.arange(-3, 3, dtype=torch.int64).reshape(2, 3),
        "i32": torch.arange(5, dtype=torch.int32),
        "u8": torch.arange(250, 256, dtype=torch.uint8),
        "bool": torch.tensor([True, False, True]),
        "scalar": torch.tensor(2.5),
        "transposed": base.t(),
        "strided": base[::2, 1::2],
        "offset_row": base[2],
        "shared_a": shared[:12].reshape(3, 4),
        "shared_b": shared.reshape(4, 6)[1:, ::3],
        "empty": torch.zeros(0, 3),
    }
    torch.save(sd, os.path.join(OUT, "tensors.ckpt"))
    expect = {k: {"shape": list(v.shape), "values": [float(t) for t in v.double().reshape(-1).tolist()]}
              for k, v in sd.items()}
    with open(os.path.join(OUT, "tensors.json"), "w") as f:
        json.dump(expect, f, separators=(",", ":"))


class _Pwn:
    def __reduce__(self):
        return (os.system, (f"touch {PWNED}",))


def malicious_fixture():
    """A torch zip whose pickle runs `posix.system("touch ...")` when unpickled."""
    torch.save({"state_dict": {"w": torch.zeros(2)}, "x": _Pwn()},
               os.path.join(OUT, "malicious.ckpt"))


def main():
    os.makedirs(OUT, exist_ok=True)
    img = make_image(32, 48, seed=3)
    Image.fromarray(img).save(os.path.join(OUT, "input.png"))
    base = dict(double_z=False, resolution=32, in_channels=3, out_ch=3, dropout=0.0)
    # GroupNorm has 32 groups, so 32 channels is the floor; a 64-channel level costs ~150 KB
    # per 3x3 conv, so only one model has one.
    # f2, two res blocks per level, attention at 16 (two per encoder level, three per decoder
    # level, plus mid) over 16x24 = 384 positions; z 16 -> embed 8.
    build("tiny_f2", dict(base, z_channels=16, ch=32, ch_mult=[1, 1], num_res_blocks=2,
                          attn_resolutions=[16]), n_embed=64, embed_dim=8, seed=10, img=img)
    # f4, channels 32 -> 64 -> 32 (nin_shortcut both ways), attention at 8, views in the ckpt.
    build("tiny_f4", dict(base, z_channels=8, ch=32, ch_mult=[1, 2, 1], num_res_blocks=1,
                          attn_resolutions=[8]), n_embed=128, embed_dim=8, seed=20, img=img,
          views=True)
    # Gumbel f8 style (GumbelVQ): z_channels == embed_dim, proj logits over n_embed codes.
    build("tiny_gumbel_f8", dict(base, z_channels=16, ch=32, ch_mult=[1, 1, 1, 1], num_res_blocks=1,
                                 attn_resolutions=[4]), n_embed=64, embed_dim=16, seed=30,
          img=img, gumbel=True)
    tensors_fixture()
    malicious_fixture()
    total = sum(os.path.getsize(os.path.join(OUT, f)) for f in os.listdir(OUT))
    print(f"wrote {OUT} ({total / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
