#!/usr/bin/env python3
"""PyTorch peer of `vqclip bench vqgan`: the same four VQGAN stages on random f16-16384
weights, timed the same way, printing the same JSON keys.

Not part of CI (CI has no Python). Nothing is downloaded. The decoder is the plain-torch
taming decoder of tools/peer_generate_step.py; the encoder below mirrors taming's `Encoder`
(`taming/modules/diffusionmodules/model.py`) the same way.

Stages, each run once untimed and then `--repeats` times, each run ending with a device
synchronisation (CUDA) so that its time includes all of its work:
- encode: `quant_conv(encoder(x))` on a random [1, 3, H, W] image in [-1, 1];
- quantize: squared distances to the 16384 codes, argmin, codebook gather (taming's
  `VectorQuantizer2` at inference);
- decode: `decoder(post_quant_conv(z_q))`;
- decode_backward: decode with `z_q.requires_grad`, `sum(y * m)` for a fixed random `m`,
  backward (weights frozen, as in VQGAN+CLIP).
FLOPs are counted as in src/bench/vqgan.rs (2 per multiply-add of convolutions, attention
products and code distances).

Usage:
    /work/pyenv/bin/python tools/peer_vqgan_bench.py [--device cpu|cuda] [--size 256x256]
        [--repeats 5] [--seed 0] [--tf32] [--json]
"""

import argparse
import json
import os
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from peer_generate_step import (  # noqa: E402
    AttnBlock,
    ResnetBlock,
    VqganDecoderSide,
    norm,
    parse_size,
    swish,
)


class Downsample(nn.Module):
    """taming's Downsample(with_conv=True): pad (0, 1, 0, 1), 3x3 stride 2."""

    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, 2, 0)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Encoder(nn.Module):
    def __init__(self, ch=128, in_ch=3, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2,
                 attn_resolutions=(16,), resolution=256, z_channels=256):
        super().__init__()
        self.conv_in = nn.Conv2d(in_ch, ch, 3, 1, 1)
        res = resolution
        cin = ch
        self.down = nn.ModuleList()
        for i, mult in enumerate(ch_mult):
            lvl = nn.Module()
            lvl.block = nn.ModuleList()
            lvl.attn = nn.ModuleList()
            cout = ch * mult
            for _ in range(num_res_blocks):
                lvl.block.append(ResnetBlock(cin, cout))
                cin = cout
                if res in attn_resolutions:
                    lvl.attn.append(AttnBlock(cin))
            lvl.downsample = Downsample(cin) if i + 1 != len(ch_mult) else None
            if i + 1 != len(ch_mult):
                res //= 2
            self.down.append(lvl)
        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(cin, cin)
        self.mid.attn_1 = AttnBlock(cin)
        self.mid.block_2 = ResnetBlock(cin, cin)
        self.norm_out = norm(cin)
        self.conv_out = nn.Conv2d(cin, z_channels, 3, 1, 1)

    def forward(self, x):
        h = self.conv_in(x)
        for lvl in self.down:
            for j, block in enumerate(lvl.block):
                h = block(h)
                if len(lvl.attn) > 0:
                    h = lvl.attn[j](h)
            if lvl.downsample is not None:
                h = lvl.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(swish(self.norm_out(h)))


class VqGan(VqganDecoderSide):
    """The whole f16 VQGAN: the generation step's decoder side plus the encoder."""

    def __init__(self, n_embed=16384, embed_dim=256, z_channels=256):
        super().__init__(n_embed, embed_dim, z_channels)
        self.encoder = Encoder(z_channels=z_channels)
        self.quant_conv = nn.Conv2d(z_channels, embed_dim, 1)

    def encode(self, x):
        return self.quant_conv(self.encoder(x))

    def quantize(self, z):
        e = self.embedding.weight
        zf = z.permute(0, 2, 3, 1).reshape(-1, e.shape[1])
        d = zf.pow(2).sum(1, keepdim=True) + e.pow(2).sum(1) - 2 * zf @ e.t()
        idx = d.argmin(1)
        b, c, h, w = z.shape
        return e[idx].view(b, h, w, c).permute(0, 3, 1, 2).contiguous()


# --- FLOPs, as src/bench/vqgan.rs counts them -------------------------------------------------


def conv_macs(cin, cout, k, hw):
    return cin * cout * k * k * hw


def resnet_macs(cin, cout, hw):
    return conv_macs(cin, cout, 3, hw) + conv_macs(cout, cout, 3, hw) + (
        conv_macs(cin, cout, 1, hw) if cin != cout else 0)


def attn_macs(c, hw):
    return 4 * conv_macs(c, c, 1, hw) + 2 * hw * hw * c


def encode_flops(w, h, ch=128, ch_mult=(1, 1, 2, 2, 4), nrb=2, attn=(16,), res=256, z=256, e=256):
    macs = conv_macs(3, ch, 3, h * w)
    cin = ch
    for i, mult in enumerate(ch_mult):
        cout = ch * mult
        for _ in range(nrb):
            macs += resnet_macs(cin, cout, h * w)
            cin = cout
            if res in attn:
                macs += attn_macs(cin, h * w)
        if i + 1 != len(ch_mult):
            res //= 2
            h //= 2
            w //= 2
            macs += conv_macs(cin, cin, 3, h * w)
    macs += 2 * resnet_macs(cin, cin, h * w) + attn_macs(cin, h * w)
    macs += conv_macs(cin, z, 3, h * w) + conv_macs(z, e, 1, h * w)
    return 2 * macs


def decode_flops(w, h, ch=128, ch_mult=(1, 1, 2, 2, 4), nrb=2, attn=(16,), res=256, z=256, e=256):
    f = 2 ** (len(ch_mult) - 1)
    h, w = h // f, w // f
    res //= f
    cin = ch * ch_mult[-1]
    macs = conv_macs(e, z, 1, h * w) + conv_macs(z, cin, 3, h * w)
    macs += 2 * resnet_macs(cin, cin, h * w) + attn_macs(cin, h * w)
    for i in reversed(range(len(ch_mult))):
        cout = ch * ch_mult[i]
        for _ in range(nrb + 1):
            macs += resnet_macs(cin, cout, h * w)
            cin = cout
            if res in attn:
                macs += attn_macs(cin, h * w)
        if i != 0:
            res *= 2
            h *= 2
            w *= 2
            macs += conv_macs(cin, cin, 3, h * w)
    macs += conv_macs(cin, 3, 3, h * w)
    return 2 * macs


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--size", default="256x256")
    ap.add_argument("--repeats", type=int, default=5, help="timed runs after one warm-up")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tf32", action="store_true",
                    help="allow TF32 on CUDA (off: plain f32, as vqclip)")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    w, h = parse_size(a.size)
    if a.repeats < 1:
        sys.exit("--repeats must be at least 1")
    dev = torch.device(a.device)
    cuda = dev.type == "cuda"
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = a.tf32
        torch.backends.cudnn.allow_tf32 = a.tf32
    torch.manual_seed(a.seed)
    model = VqGan().eval().requires_grad_(False).to(dev)
    img = torch.rand(1, 3, h, w, device=dev) * 2 - 1
    with torch.no_grad():
        z = model.encode(img)
        zq = model.quantize(z)
        y = model.decode(zq)
    m = torch.rand(y.shape, device=dev) * 2 - 1

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def encode():
        with torch.no_grad():
            model.encode(img)

    def quantize():
        with torch.no_grad():
            model.quantize(z)

    def decode():
        with torch.no_grad():
            model.decode(zq)

    def decode_backward():
        zv = zq.detach().clone().requires_grad_(True)
        (model.decode(zv) * m).sum().backward()
        return zv.grad

    def timed(name, flops, fn):
        fn()
        sync()
        times = []
        for _ in range(a.repeats):
            t = time.perf_counter()
            fn()
            sync()
            times.append(time.perf_counter() - t)
        times.sort()
        return {
            "stage": name,
            "gflop": flops / 1e9,
            "min_ms": times[0] * 1e3,
            "median_ms": times[len(times) // 2] * 1e3,
            "gflops": flops / times[0] / 1e9,
        }

    fd = decode_flops(w, h)
    positions = (w // 16) * (h // 16)
    stages = [
        timed("encode", encode_flops(w, h), encode),
        timed("quantize", 2 * positions * 16384 * 256, quantize),
        timed("decode", fd, decode),
        timed("decode_backward", 2 * fd, decode_backward),
    ]
    r = {
        "peer": "pytorch",
        "torch": torch.__version__,
        "device": a.device,
        "adapter": torch.cuda.get_device_name(dev) if cuda else "cpu",
        "backend": "cuda" if cuda else "cpu",
        "threads": torch.get_num_threads(),
        "tf32": bool(a.tf32 and cuda),
        "vqgan": "random f16-16384 (plain torch)",
        "width": w,
        "height": h,
        "repeats": a.repeats,
        "stages": stages,
    }
    if a.json:
        print(json.dumps(r, indent=2))
    else:
        print(f"pytorch vqgan {w}x{h} on {r['adapter']} (torch {torch.__version__}, "
              f"{r['threads']} threads, tf32 {r['tf32']}), {a.repeats} runs per stage")
        for s in stages:
            print(f"  {s['stage']:<16} min {s['min_ms']:10.2f} ms  median {s['median_ms']:10.2f} ms"
                  f"  {s['gflops']:8.2f} GFLOP/s ({s['gflop']:.3f} GFLOP)")


if __name__ == "__main__":
    main()
