#!/usr/bin/env python3
"""Checks that a VQGAN written by `vqclip train vqgan` (NAME.safetensors + NAME.yaml) loads in
taming-transformers' own VQModel and reconstructs like vqclip. Not run in CI.

    /work/pyenv/bin/pip install taming-transformers-rom1504 pytorch-lightning einops
    /work/pyenv/bin/python tools/verify_vqgan_taming.py \
        weights/vqgan/shapes.safetensors weights/vqgan/shapes.yaml [target/release/vqclip]

1. builds taming.models.vqgan.VQModel from the .yaml exactly as taming's scripts do
   (instantiate_from_config(config.model)) and load_state_dict(strict=True) on the model keys;
2. renders a few flat-colour shape images (PIL), reconstructs them with taming
   (encode -> quantize -> decode, 8-bit output round(clamp((x+1)/2)*255)), and reports PSNR;
3. with a vqclip binary: runs `vqclip reconstruct --codes` on the same PNGs and reports how
   many codes agree and the max abs difference of the 8-bit outputs.
"""
import json
import os
import subprocess
import sys
import tempfile

import numpy as np
import torch
from omegaconf import OmegaConf
from PIL import Image, ImageDraw
from safetensors.torch import load_file


# taming/main.py (imported by taming/models/vqgan.py) needs a module that newer
# pytorch_lightning releases moved: alias it.
try:
    import pytorch_lightning.utilities.distributed  # noqa: F401
except ImportError:
    import types
    from pytorch_lightning.utilities import rank_zero_only
    _shim = types.ModuleType("pytorch_lightning.utilities.distributed")
    _shim.rank_zero_only = rank_zero_only
    sys.modules["pytorch_lightning.utilities.distributed"] = _shim


def instantiate_from_config(config):
    """taming.main.instantiate_from_config (importing taming.main itself needs an old
    pytorch_lightning): import `target`, call it with `params`."""
    import importlib
    module, cls = config["target"].rsplit(".", 1)
    return getattr(importlib.import_module(module), cls)(**config.get("params", dict()))

COLOURS = [(220, 30, 30), (30, 160, 40), (30, 60, 220), (240, 220, 30),
           (240, 140, 20), (140, 40, 180), (250, 250, 250), (20, 20, 20)]


def images(n, size, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        bg, fg = rng.choice(len(COLOURS), 2, replace=False)
        im = Image.new("RGB", (size * 4, size * 4), COLOURS[bg])
        d = ImageDraw.Draw(im)
        r = rng.integers(size // 2, size + size // 2)
        cx, cy = rng.integers(r, size * 4 - r, 2)
        box = [cx - r, cy - r, cx + r, cy + r]
        kind = rng.integers(0, 3)
        if kind == 0:
            d.ellipse(box, fill=COLOURS[fg])
        elif kind == 1:
            d.rectangle(box, fill=COLOURS[fg])
        else:
            d.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=COLOURS[fg])
        out.append(np.asarray(im.resize((size, size), Image.BOX)))
    return out


def to8(x):
    return np.round(np.clip((x + 1) / 2, 0, 1) * 255).astype(np.uint8)


def main():
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    weights, yaml_path = sys.argv[1], sys.argv[2]
    vqclip = sys.argv[3] if len(sys.argv) > 3 else None
    cfg = OmegaConf.load(yaml_path)
    model = instantiate_from_config(cfg.model).eval()
    sd = load_file(weights)
    model_keys = {k for k in model.state_dict() if not k.startswith("loss.")}
    missing, unexpected = model_keys - set(sd), set(sd) - model_keys
    assert not missing and not unexpected, f"missing {missing}, unexpected {unexpected}"
    # strict on the model's keys (the loss has none: DummyLoss)
    model.load_state_dict(sd, strict=True)
    print(f"taming VQModel loaded {len(sd)} tensors strictly from {weights}")
    size = cfg.model.params.ddconfig.resolution
    imgs = images(8, size)
    se, worst, agree, total = 0.0, 0, 0, 0
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        for i, px in enumerate(imgs):
            x = torch.from_numpy(px.copy()).float().permute(2, 0, 1)[None] / 127.5 - 1
            quant, _, (_, _, idx) = model.encode(x)
            rec = to8(model.decode(quant)[0].permute(1, 2, 0).numpy())
            se += float(((rec.astype(np.float64) - px) ** 2).mean())
            if vqclip:
                src = os.path.join(tmp, f"in{i}.png")
                out = os.path.join(tmp, f"out{i}.png")
                codes = os.path.join(tmp, f"codes{i}.json")
                Image.fromarray(px).save(src)
                subprocess.run([vqclip, "reconstruct", "--vqgan", weights, "--config", yaml_path,
                                src, "-o", out, "--codes", codes],
                               check=True, stderr=subprocess.DEVNULL)
                ours = np.asarray(Image.open(out).convert("RGB"))
                worst = max(worst, int(np.abs(ours.astype(int) - rec.astype(int)).max()))
                c = np.array(json.load(open(codes))["codes"]).reshape(-1)
                agree += int((c == idx.reshape(-1).numpy()).sum())
                total += c.size
    mse = se / len(imgs)
    print(f"taming reconstruction PSNR {10 * np.log10(255 ** 2 / mse):.2f} dB "
          f"over {len(imgs)} PIL-drawn {size}x{size} shape images")
    if vqclip:
        print(f"vqclip vs taming: {agree}/{total} codes equal, "
              f"8-bit output max abs diff {worst}")


if __name__ == "__main__":
    main()
