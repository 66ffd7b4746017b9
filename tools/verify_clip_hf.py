#!/usr/bin/env python3
"""Checks a CLIP folder written by `vqclip train clip` against Hugging Face transformers.

    /work/pyenv/bin/python tools/verify_clip_hf.py [DIR] [--vqclip target/release/vqclip]
        [--write-fixture tests/fixtures/clip/shapes_tokenizer_ids.json]

1. The folder loads with CLIPModel.from_pretrained, CLIPTokenizer and CLIPImageProcessor.
2. transformers' token ids of shapes captions and odd texts; with --write-fixture they are
   written for the Rust test `train::clip::tests::tokenizer_matches_transformers`.
3. Text and image embeddings from transformers and from `vqclip embed --json` on the same
   texts and PNG images agree (cosine >= 0.9999 each).

Not run in CI (CI has no Python).
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np
import torch
from PIL import Image, ImageDraw
from transformers import CLIPImageProcessor, CLIPModel, CLIPTokenizer

TEXTS = [
    "a red circle on a blue background",
    "a small green triangle at the bottom right on a white background",
    "a large purple diamond on a yellow background",
    "a black square in the centre",
    "an orange circle at the top left and a white diamond at the bottom right",
    "a plain blue background",
    "Zebra-crossing #42!",
    "naïve café ☃",
    "the backgrounds, circles & squares",
    "x",
    "",
    "A RED   CIRCLE",
]


def images(tmp):
    """A few PNGs: drawn shapes at 64 px and 100x80 (resized and cropped), and noise."""
    out = []
    rng = np.random.default_rng(0)
    specs = [
        ((64, 64), (40, 70, 220), "ellipse", (220, 30, 30), (12, 12, 52, 52)),
        ((64, 64), (245, 245, 245), "rectangle", (40, 170, 60), (30, 30, 58, 58)),
        ((100, 80), (15, 15, 15), "polygon", (240, 220, 40), [(50, 10), (80, 70), (20, 70)]),
    ]
    for i, (size, bg, kind, fg, box) in enumerate(specs):
        im = Image.new("RGB", size, bg)
        d = ImageDraw.Draw(im)
        getattr(d, kind)(box, fill=fg)
        p = os.path.join(tmp, f"img{i}.png")
        im.save(p)
        out.append(p)
    noise = rng.integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
    p = os.path.join(tmp, "noise.png")
    Image.fromarray(noise).save(p)
    out.append(p)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("dir", nargs="?", default="weights/clip")
    ap.add_argument("--vqclip", default="target/release/vqclip")
    ap.add_argument("--write-fixture")
    a = ap.parse_args()

    model = CLIPModel.from_pretrained(a.dir).eval()
    tok = CLIPTokenizer.from_pretrained(a.dir)
    proc = CLIPImageProcessor.from_pretrained(a.dir)
    ctx = model.config.text_config.max_position_embeddings
    print(f"loaded {a.dir}: vocab {len(tok)}, context {ctx}, "
          f"eos {tok.eos_token_id} (config {model.config.text_config.eos_token_id})")
    assert tok.eos_token_id == model.config.text_config.eos_token_id
    assert tok.eos_token_id == len(tok) - 1

    ids = [tok(t, truncation=True, max_length=ctx)["input_ids"] for t in TEXTS]
    for t, i in zip(TEXTS, ids):
        print(f"  {t!r}: {i}")
    if a.write_fixture:
        with open(a.write_fixture, "w") as f:
            json.dump({"context": ctx, "texts": TEXTS, "ids": ids}, f, ensure_ascii=False, indent=1)
        print(f"wrote {a.write_fixture}")

    texts = [t for t in TEXTS if t]
    with tempfile.TemporaryDirectory() as tmp:
        paths = images(tmp)
        cmd = [a.vqclip, "embed", "--clip", a.dir, "--json"]
        for t in texts:
            cmd += ["--text", t]
        for p in paths:
            cmd += ["--image", p]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            sys.exit(f"vqclip embed failed: {res.stderr}")
        ours = json.loads(res.stdout)
        pil = [Image.open(p).convert("RGB") for p in paths]
        with torch.no_grad():
            ti = tok(texts, padding=True, truncation=True, max_length=ctx, return_tensors="pt")
            pv = proc(images=pil, return_tensors="pt")["pixel_values"]
            out = model(input_ids=ti["input_ids"], attention_mask=ti["attention_mask"],
                        pixel_values=pv)
    worst = 1.0
    for name, ref, got in [("text", out.text_embeds, ours["text_embeds"]),
                           ("image", out.image_embeds, ours["image_embeds"])]:
        ref = ref.numpy()
        got = np.asarray(got, dtype=np.float64)
        assert ref.shape == got.shape, (name, ref.shape, got.shape)
        cos = (ref * got).sum(1) / np.linalg.norm(ref, axis=1) / np.linalg.norm(got, axis=1)
        print(f"{name} cosines: {np.round(cos, 6).tolist()}")
        worst = min(worst, float(cos.min()))
    print(f"logit_scale {model.logit_scale.item():.4f}; worst cosine {worst:.6f}")
    if worst < 0.9999:
        sys.exit("FAIL: cosine below 0.9999")
    print("OK")


if __name__ == "__main__":
    main()
