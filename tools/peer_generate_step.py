#!/usr/bin/env python3
"""PyTorch peer of `vqclip bench generate`: times VQGAN+CLIP optimisation steps on
random-weight models of the same shapes, to compare speed and memory with vqclip.

Not part of CI (CI has no Python). Nothing is downloaded:

- CLIP ViT-B/32: transformers' `CLIPModel(CLIPConfig())` (its defaults are the ViT-B/32
  shapes), randomly initialised; only the image tower runs in the step, as in vqclip.
- VQGAN f16-16384: the taming-transformers decoder written out below in plain torch
  (`taming/modules/diffusionmodules/model.py`, see ../shared/docs/MODEL_FACTS.md part B):
  `post_quant_conv`, `conv_in`, mid (resnet, attention, resnet), up levels of
  `num_res_blocks + 1` resnet blocks (attention after each at resolution 16) with nearest x2
  + conv upsampling, GroupNorm(32, eps 1e-6) + swish, `conv_out`; plus the 16384x256
  codebook. The encoder is not built (generation from random codes never runs it), so the
  weights here are smaller than vqclip's, which loads the whole VQGAN: compare
  `step_peak_bytes` (what a step adds) rather than `peak_bytes`.

One step, as in the VQGAN+CLIP notebooks and `vqclip generate`: nearest-code quantisation
with a straight-through gradient, decode, `(x + 1) / 2` clamped with ClampWithGrad,
`cutn` random square crops (side uniform between min(W, H, 224) and min(W, H)) resized to
224x224 (area interpolation when shrinking, bilinear when enlarging), noise
`U(0, 0.1) * N(0, 1)` per cutout, CLIP normalisation, the image tower, the spherical
distance loss to a random text embedding (a noise prompt), backward, Adam (lr 0.1) on z,
clamp z to the codebook's per-channel range. Each step ends with `loss.item()`, so its time
includes all of its device work.

Usage:
    /work/pyenv/bin/python tools/peer_generate_step.py [--device cpu|cuda] [--size 256x256]
        [--cutn 32] [--steps 3] [--seed 0] [--tf32] [--json]

Memory: on CUDA `torch.cuda.max_memory_allocated` (peak of live tensors, like vqclip's pool
figure); on CPU the growth of the process's resident set (VmHWM after resetting it through
/proc/self/clear_refs), which also counts allocator caching and is only a rough figure.
"""

import argparse
import json
import math
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


# --- taming-transformers decoder (plain torch) ---------------------------------------------


def norm(c):
    return nn.GroupNorm(num_groups=32, num_channels=c, eps=1e-6, affine=True)


def swish(x):
    return x * torch.sigmoid(x)


class ResnetBlock(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.norm1 = norm(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, 1, 1)
        self.norm2 = norm(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1)
        self.nin_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x):
        h = self.conv1(swish(self.norm1(x)))
        h = self.conv2(swish(self.norm2(h)))
        if self.nin_shortcut is not None:
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.norm = norm(c)
        self.q = nn.Conv2d(c, c, 1)
        self.k = nn.Conv2d(c, c, 1)
        self.v = nn.Conv2d(c, c, 1)
        self.proj_out = nn.Conv2d(c, c, 1)

    def forward(self, x):
        b, c, h, w = x.shape
        hn = self.norm(x)
        q = self.q(hn).reshape(b, c, h * w).permute(0, 2, 1)  # [b, hw, c]
        k = self.k(hn).reshape(b, c, h * w)  # [b, c, hw]
        w_ = torch.softmax(torch.bmm(q, k) * c ** -0.5, dim=2)  # [b, hw(q), hw(k)]
        v = self.v(hn).reshape(b, c, h * w)
        out = torch.bmm(v, w_.permute(0, 2, 1)).reshape(b, c, h, w)
        return x + self.proj_out(out)


class Upsample(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, 1, 1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Decoder(nn.Module):
    def __init__(self, ch=128, out_ch=3, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2,
                 attn_resolutions=(16,), resolution=256, z_channels=256):
        super().__init__()
        levels = len(ch_mult)
        cin = ch * ch_mult[-1]
        res = resolution // 2 ** (levels - 1)
        self.conv_in = nn.Conv2d(z_channels, cin, 3, 1, 1)
        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(cin, cin)
        self.mid.attn_1 = AttnBlock(cin)
        self.mid.block_2 = ResnetBlock(cin, cin)
        self.up = nn.ModuleList()
        for i in reversed(range(levels)):
            lvl = nn.Module()
            lvl.block = nn.ModuleList()
            lvl.attn = nn.ModuleList()
            cout = ch * ch_mult[i]
            for _ in range(num_res_blocks + 1):
                lvl.block.append(ResnetBlock(cin, cout))
                cin = cout
                if res in attn_resolutions:
                    lvl.attn.append(AttnBlock(cin))
            lvl.upsample = Upsample(cin) if i != 0 else None
            if i != 0:
                res *= 2
            self.up.insert(0, lvl)
        self.norm_out = norm(cin)
        self.conv_out = nn.Conv2d(cin, out_ch, 3, 1, 1)

    def forward(self, z):
        h = self.conv_in(z)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        for lvl in reversed(self.up):
            for j, block in enumerate(lvl.block):
                h = block(h)
                if len(lvl.attn) > 0:
                    h = lvl.attn[j](h)
            if lvl.upsample is not None:
                h = lvl.upsample(h)
        return self.conv_out(swish(self.norm_out(h)))


class VqganDecoderSide(nn.Module):
    """What generation uses of a VQGAN f16: the codebook, post_quant_conv and the decoder."""

    def __init__(self, n_embed=16384, embed_dim=256, z_channels=256):
        super().__init__()
        self.embedding = nn.Embedding(n_embed, embed_dim)
        self.embedding.weight.data.uniform_(-1.0 / n_embed, 1.0 / n_embed)
        self.post_quant_conv = nn.Conv2d(embed_dim, z_channels, 1)
        self.decoder = Decoder(z_channels=z_channels)

    def decode(self, z_q):
        return self.decoder(self.post_quant_conv(z_q))


# --- the VQGAN+CLIP step ---------------------------------------------------------------------


class ReplaceGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_forward, x_backward):
        ctx.shape = x_backward.shape
        return x_forward

    @staticmethod
    def backward(ctx, grad_in):
        return None, grad_in.sum_to_size(ctx.shape)


class ClampWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, lo, hi):
        ctx.lo, ctx.hi = lo, hi
        ctx.save_for_backward(x)
        return x.clamp(lo, hi)

    @staticmethod
    def backward(ctx, grad_in):
        (x,) = ctx.saved_tensors
        return grad_in * (grad_in * (x - x.clamp(ctx.lo, ctx.hi)) >= 0), None, None


def vector_quantize(x, codebook):
    """x: [1, h, w, E] -> nearest codebook rows, straight-through gradient to x."""
    d = x.pow(2).sum(dim=-1, keepdim=True) + codebook.pow(2).sum(dim=1) - 2 * x @ codebook.T
    x_q = F.one_hot(d.argmin(-1), codebook.shape[0]).to(d.dtype) @ codebook
    return ReplaceGrad.apply(x_q, x)


def make_cutouts(img, cutn, cut_size, gen):
    """cutn random square crops of img [1, 3, H, W], each resized to cut_size."""
    _, _, h, w = img.shape
    max_size = min(w, h)
    min_size = min(w, h, cut_size)
    cuts = []
    for _ in range(cutn):
        size = int(torch.rand([], generator=gen) * (max_size - min_size) + min_size)
        ox = int(torch.randint(0, w - size + 1, [], generator=gen))
        oy = int(torch.randint(0, h - size + 1, [], generator=gen))
        crop = img[:, :, oy:oy + size, ox:ox + size]
        mode = "area" if size >= cut_size else "bilinear"
        kw = {} if mode == "area" else {"align_corners": False}
        cuts.append(F.interpolate(crop, size=(cut_size, cut_size), mode=mode, **kw))
    return ClampWithGrad.apply(torch.cat(cuts), 0.0, 1.0)


def spherical_dist(x, y):
    x = F.normalize(x, dim=-1)
    y = F.normalize(y, dim=-1)
    return (x - y).norm(dim=-1).div(2).arcsin().pow(2).mul(2)


def rss_bytes(field):
    """VmRSS or VmHWM of this process in bytes (Linux), or None."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def reset_rss_peak():
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def parse_size(s):
    try:
        w, h = (int(v) for v in s.lower().split("x"))
    except ValueError:
        sys.exit(f"--size '{s}' is not WxH (e.g. 256x256)")
    if w <= 0 or h <= 0 or w % 16 or h % 16:
        sys.exit(f"--size {s}: width and height must be positive multiples of 16")
    return w, h


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--size", default="256x256")
    ap.add_argument("--cutn", type=int, default=32)
    ap.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tf32", action="store_true",
                    help="allow TF32 matmuls and convolutions on CUDA (off: plain f32, as vqclip)")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    w, h = parse_size(a.size)
    if a.cutn < 1 or a.steps < 1:
        sys.exit("--cutn and --steps must be at least 1")
    dev = torch.device(a.device)
    cuda = dev.type == "cuda"
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = a.tf32
        torch.backends.cudnn.allow_tf32 = a.tf32
    torch.manual_seed(a.seed)

    from transformers import CLIPConfig, CLIPModel

    clip = CLIPModel(CLIPConfig()).eval().requires_grad_(False).to(dev)
    vq = VqganDecoderSide().eval().requires_grad_(False).to(dev)
    cut_size = clip.config.vision_config.image_size
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073], device=dev).view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711], device=dev).view(1, 3, 1, 1)
    target = torch.randn(1, clip.config.projection_dim, device=dev)

    codebook = vq.embedding.weight
    toks_y, toks_x = h // 16, w // 16
    idx = torch.randint(codebook.shape[0], [toks_y * toks_x], device=dev)
    z = (F.one_hot(idx, codebook.shape[0]).to(codebook.dtype) @ codebook)
    z = z.view(1, toks_y, toks_x, -1).permute(0, 3, 1, 2).contiguous().requires_grad_(True)
    z_min = codebook.min(dim=0).values.view(1, -1, 1, 1)
    z_max = codebook.max(dim=0).values.view(1, -1, 1, 1)
    opt = torch.optim.Adam([z], lr=0.1)
    gen = torch.Generator().manual_seed(a.seed)

    def step():
        opt.zero_grad(set_to_none=True)
        z_q = vector_quantize(z.movedim(1, 3), codebook).movedim(3, 1)
        out = ClampWithGrad.apply(vq.decode(z_q).add(1).div(2), 0.0, 1.0)
        cuts = make_cutouts(out, a.cutn, cut_size, gen)
        fac = torch.rand([a.cutn, 1, 1, 1], generator=gen).to(dev) * 0.1
        cuts = cuts + fac * torch.randn(cuts.shape, generator=gen).to(dev)
        emb = clip.get_image_features(pixel_values=(cuts - mean) / std)
        if not torch.is_tensor(emb):  # transformers versions that return an output object
            emb = emb.pooler_output
        loss = spherical_dist(emb[:, None, :], target[None, :, :]).mean()
        loss.backward()
        opt.step()
        with torch.no_grad():
            z.copy_(z.maximum(z_min).minimum(z_max))
        return loss.item()

    weights_bytes = sum(p.numel() * p.element_size()
                        for m in (clip, vq) for p in m.parameters())
    if cuda:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        base = rss_bytes("VmRSS")
        peak_reset = reset_rss_peak()
    t = time.perf_counter()
    first = step()
    warmup_ms = (time.perf_counter() - t) * 1e3
    if not math.isfinite(first):
        sys.exit(f"the warm-up step's loss is {first}")
    step_ms = []
    for _ in range(a.steps):
        t = time.perf_counter()
        step()
        step_ms.append((time.perf_counter() - t) * 1e3)
    if cuda:
        peak = torch.cuda.max_memory_allocated()
        adapter = torch.cuda.get_device_name(dev)
        mem_kind = "torch.cuda.max_memory_allocated"
    else:
        peak = rss_bytes("VmHWM") if peak_reset else None
        adapter = "cpu"
        mem_kind = "process RSS high-water mark" if peak is not None else "unavailable"
    r = {
        "peer": "pytorch",
        "torch": torch.__version__,
        "device": a.device,
        "adapter": adapter,
        "threads": torch.get_num_threads(),
        "tf32": bool(a.tf32 and cuda),
        "clip": "random ViT-B/32 (transformers CLIPModel(CLIPConfig()))",
        "vqgan": "random f16-16384 decoder (plain torch)",
        "width": w,
        "height": h,
        "cutn": a.cutn,
        "warmup_ms": warmup_ms,
        "step_ms": step_ms,
        "mean_ms": sum(step_ms) / len(step_ms),
        "weights_bytes": weights_bytes,
        "memory_measure": mem_kind,
        "base_bytes": base,
        "peak_bytes": peak,
        "step_peak_bytes": None if peak is None or base is None else max(peak - base, 0),
    }
    if a.json:
        print(json.dumps(r, indent=2))
    else:
        mib = lambda b: "?" if b is None else f"{b / 2**20:.1f}"
        print(f"pytorch generate step {w}x{h}, cutn {a.cutn} on {adapter} "
              f"(torch {torch.__version__}, {r['threads']} threads, tf32 {r['tf32']})")
        print(f"  warm-up step: {warmup_ms:.1f} ms")
        print(f"  {r['mean_ms']:.1f} ms/step (mean of {len(step_ms)} steps: "
              f"{', '.join(f'{t:.1f}' for t in step_ms)} ms)")
        print(f"  memory ({mem_kind}): weights {mib(weights_bytes)} MiB, before the steps "
              f"{mib(base)} MiB, peak {mib(peak)} MiB (a step adds {mib(r['step_peak_bytes'])} MiB)")


if __name__ == "__main__":
    main()
