#!/usr/bin/env python3
"""PyTorch peer of `vqclip bench all`: runs the same item list, read from vqclip's
report.json, and writes per-item times that `vqclip bench all --merge-peer` adds as a column.

Run it right after vqclip on the same machine, so that both see the same load:

    vqclip bench all --quick --report DIR
    /work/pyenv/bin/python tools/peer_bench_all.py --report DIR/report.json --out DIR/peer.json
    vqclip bench all --report DIR --merge-peer DIR/peer.json

Each item is the same work in PyTorch (f32; on CUDA with TF32 off unless --tf32):
matmul -> torch.matmul (B transposed where the item says Bt), attention ->
F.scaled_dot_product_attention (attention backward: the same on [B, T, H*D] inputs
split into heads, then backward of sum(o * w) to q, k, v), conv3x3 -> F.conv2d(padding=1) with bias, layer_norm ->
F.layer_norm, group_norm+swish -> F.silu(F.group_norm(32 groups)), add, gelu (erf), the
CLIP towers -> transformers' CLIPModel(CLIPConfig()) (ViT-B/32 shapes, random weights)
get_text_features / get_image_features under no_grad, vqgan decode -> the taming decoder of
tools/peer_generate_step.py, generate step -> that script's step (quantise, decode, cutouts,
CLIP image tower, loss, backward, Adam). Timing as vqclip's: one untimed run, then runs
until --seconds have passed (3 to 50), each synchronised; min and median. Nothing is
downloaded.
"""

import argparse
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import peer_generate_step as pg  # noqa: E402


def timed(fn, dev, seconds):
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    fn()
    sync()
    times = []
    start = time.perf_counter()
    while len(times) < 3 or (time.perf_counter() - start < seconds and len(times) < 50):
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    times.sort()
    return times[0] * 1e3, times[len(times) // 2] * 1e3


class Models:
    def __init__(self, dev):
        self.dev = dev
        self._clip = None
        self._vq = None

    def clip(self):
        if self._clip is None:
            from transformers import CLIPConfig, CLIPModel
            self._clip = CLIPModel(CLIPConfig()).eval().requires_grad_(False).to(self.dev)
        return self._clip

    def vq(self):
        if self._vq is None:
            self._vq = pg.VqganDecoderSide().eval().requires_grad_(False).to(self.dev)
        return self._vq


def features(out):
    # transformers versions differ: a tensor, or an output object.
    return out if torch.is_tensor(out) else out.pooler_output


def generate_step(models, size, cutn, dev):
    clip, vq = models.clip(), models.vq()
    cut_size = clip.config.vision_config.image_size
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073], device=dev).view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711], device=dev).view(1, 3, 1, 1)
    target = torch.randn(1, clip.config.projection_dim, device=dev)
    codebook = vq.embedding.weight
    toks = size // 16
    idx = torch.randint(codebook.shape[0], [toks * toks], device=dev)
    z = (F.one_hot(idx, codebook.shape[0]).to(codebook.dtype) @ codebook)
    z = z.view(1, toks, toks, -1).permute(0, 3, 1, 2).contiguous().requires_grad_(True)
    z_min = codebook.min(dim=0).values.view(1, -1, 1, 1)
    z_max = codebook.max(dim=0).values.view(1, -1, 1, 1)
    opt = torch.optim.Adam([z], lr=0.1)
    gen = torch.Generator().manual_seed(0)

    def step():
        opt.zero_grad(set_to_none=True)
        z_q = pg.vector_quantize(z.movedim(1, 3), codebook).movedim(3, 1)
        out = pg.ClampWithGrad.apply(vq.decode(z_q).add(1).div(2), 0.0, 1.0)
        cuts = pg.make_cutouts(out, cutn, cut_size, gen)
        fac = torch.rand([cutn, 1, 1, 1], generator=gen).to(dev) * 0.1
        cuts = cuts + fac * torch.randn(cuts.shape, generator=gen).to(dev)
        emb = features(clip.get_image_features(pixel_values=(cuts - mean) / std))
        loss = pg.spherical_dist(emb[:, None, :], target[None, :, :]).mean()
        loss.backward()
        opt.step()
        with torch.no_grad():
            z.copy_(z.maximum(z_min).minimum(z_max))
        return loss.item()

    return step


def make(spec, models, dev):
    """A no-argument function doing the item's work once."""
    r = lambda *s: torch.rand(*s, device=dev) * 2 - 1  # noqa: E731
    kind = spec["kind"]
    if kind == "matmul":
        a = r(spec["batch"], spec["m"], spec["k"])
        if spec["trans_b"]:
            b = r(spec["n"], spec["k"])
            return lambda: torch.matmul(a, b.t())
        b = r(spec["k"], spec["n"])
        return lambda: torch.matmul(a, b)
    if kind == "attention":
        shape = (spec["batch"], spec["heads"], spec["tokens"], spec["head_dim"])
        q, k, v = r(*shape), r(*shape), r(*shape)
        return lambda: F.scaled_dot_product_attention(q, k, v, is_causal=spec["causal"])
    if kind == "attention_backward":
        b, h, t, d = spec["batch"], spec["heads"], spec["tokens"], spec["head_dim"]
        q, k, v = (r(b, t, h * d).requires_grad_() for _ in range(3))
        w = r(b, t, h * d)

        def step():
            heads = lambda x: x.view(b, t, h, d).transpose(1, 2)  # noqa: E731
            o = F.scaled_dot_product_attention(heads(q), heads(k), heads(v),
                                               is_causal=spec["causal"])
            (o.transpose(1, 2).reshape(b, t, h * d) * w).sum().backward()
            q.grad = k.grad = v.grad = None

        return step
    if kind == "conv3x3":
        x = r(1, spec["cin"], spec["h"], spec["w"])
        w = r(spec["cout"], spec["cin"], 3, 3)
        b = r(spec["cout"])
        return lambda: F.conv2d(x, w, b, padding=1)
    if kind == "layer_norm":
        x = r(spec["rows"], spec["cols"])
        g, b = r(spec["cols"]), r(spec["cols"])
        return lambda: F.layer_norm(x, (spec["cols"],), g, b, 1e-5)
    if kind == "group_norm_swish":
        x = r(1, spec["c"], spec["h"], spec["w"])
        g, b = r(spec["c"]), r(spec["c"])
        return lambda: F.silu(F.group_norm(x, 32, g, b, 1e-6))
    if kind == "add":
        a, b = r(spec["n"]), r(spec["n"])
        return lambda: a + b
    if kind == "dispatches":
        a = r(64)

        def chain():
            x = a
            for _ in range(spec["count"]):
                x = x + a
            return x

        return chain
    if kind == "gelu":
        a = r(spec["n"])
        return lambda: F.gelu(a)
    if kind == "text_encode":
        clip = models.clip()
        ids = torch.randint(clip.config.text_config.vocab_size,
                            (spec["batch"], clip.config.text_config.max_position_embeddings),
                            device=dev)
        return lambda: features(clip.get_text_features(input_ids=ids))
    if kind == "image_encode":
        clip = models.clip()
        s = clip.config.vision_config.image_size
        px = r(spec["batch"], 3, s, s)
        return lambda: features(clip.get_image_features(pixel_values=px))
    if kind == "vqgan_decode":
        vq = models.vq()
        t = spec["size"] // 16
        zq = r(1, 256, t, t)
        return lambda: vq.decode(zq)
    if kind == "generate_step":
        return generate_step(models, spec["size"], spec["cutn"], dev)
    raise SystemExit(f"unknown item kind {kind!r} in the report (a newer vqclip?)")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--report", required=True, help="vqclip bench all's report.json")
    ap.add_argument("--out", required=True, help="where to write the peer figures (JSON)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--seconds", type=float, default=1.0, help="timing per item")
    ap.add_argument("--tf32", action="store_true", help="allow TF32 on CUDA (off: plain f32)")
    a = ap.parse_args()
    with open(a.report) as f:
        report = json.load(f)
    dev = torch.device(a.device)
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = a.tf32
        torch.backends.cudnn.allow_tf32 = a.tf32
    torch.manual_seed(0)
    models = Models(dev)
    items = []
    for it in report["items"]:
        spec = it["spec"]
        print(f"{it['name']}…", file=sys.stderr)
        fn = make(spec, models, dev)
        if spec["kind"] in ("generate_step", "attention_backward"):
            ms_min, ms_med = timed(fn, dev, a.seconds)
        else:
            with torch.no_grad():
                ms_min, ms_med = timed(fn, dev, a.seconds)
        items.append({"name": it["name"], "ms_min": ms_min, "ms_median": ms_med})
    if dev.type == "cuda":
        what = f"PyTorch {torch.__version__} CUDA ({torch.cuda.get_device_name(dev)}), " \
               f"TF32 {'on' if a.tf32 else 'off'}"
    else:
        what = f"PyTorch {torch.__version__} CPU ({torch.get_num_threads()} threads)"
    out = {"peer": what, "items": items}
    tmp = a.out + ".tmp"
    with open(tmp, "w") as f:
        json.dump(out, f, indent=2)
    os.replace(tmp, a.out)
    for i in items:
        print(f"{i['name']:<40} {i['ms_median']:10.3f} ms (min {i['ms_min']:.3f})")


if __name__ == "__main__":
    main()
