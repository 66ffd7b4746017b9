#!/usr/bin/env python3
"""PyTorch probe of VQGAN+CLIP recipes for the small shipped models (not used by CI).

It re-implements `vqclip generate`'s loop in PyTorch on the shipped weights (taming's VQModel
from weights/vqgan/shapes.yaml + .safetensors, transformers' CLIPModel from weights/clip), about
25x faster than vqclip on the 2-core lavapipe machine, so that recipes can be compared over
many prompts and seeds before one is built into vqclip. Its random numbers differ from
vqclip's, so images are not the same; the recipe is (docs/generation_recipe.md).

Options: --sched G:N,G:N,... (coarse-to-fine latent grids: G cells per side for N steps,
bilinearly upsampled to the full latent before quantisation); --cands K --pick S (K random
starts of S steps at the first grid, keep the lowest whole-image loss); --aug shift,blur (the
`jitter` views: zoom U(0.9, 1.2), shift up to 10% with edges extended, 5-tap binomial blur);
--noise, --lr, --cutn, --tv. Prints the final loss on the whole image ("clean").
Experiments that did not make the preset (docs/generation_recipe.md): --blur N (N passes of
the blur), --pal W (palette prior), --neg auto|"a|b" with --negw W (negative prompts) or
--ce SCALE (softmax over prompt and negatives), --scenes N (start from the best of N images
exported by the ignored test export_shapes_pairs to /tmp/shapes, encoded by the VQGAN).

    /work/pyenv/bin/python tools/generation_recipe_probe.py --prompt "a red circle on a blue background" \
        --sched 2:8,4:8,8:8,16:4 --cands 3 --pick 3 --aug shift,blur --lr 0.3 --seed 1 --out x.png
"""
import sys, os, types, importlib, argparse, time
import torch, torch.nn.functional as F, numpy as np
from omegaconf import OmegaConf
from safetensors.torch import load_file
from PIL import Image
try:
    import pytorch_lightning.utilities.distributed
except ImportError:
    from pytorch_lightning.utilities import rank_zero_only
    m = types.ModuleType("pytorch_lightning.utilities.distributed"); m.rank_zero_only = rank_zero_only
    sys.modules["pytorch_lightning.utilities.distributed"] = m
from transformers import CLIPModel, CLIPTokenizer
torch.set_num_threads(2)
ap = argparse.ArgumentParser()
ap.add_argument('--prompt', default='a red circle on a blue background')
ap.add_argument('--vq', default='/work/main/weights/vqgan/shapes.safetensors')
ap.add_argument('--clip', default='/work/main/weights/clip')
ap.add_argument('--steps', type=int, default=30); ap.add_argument('--lr', type=float, default=0.1)
ap.add_argument('--cutn', type=int, default=8); ap.add_argument('--seed', type=int, default=1)
ap.add_argument('--noise', type=float, default=0.1)
ap.add_argument('--coarse', type=int, default=0, help='latent grid side to optimise (0 = full)')
ap.add_argument('--aug', default='none')
ap.add_argument('--tv', type=float, default=0)
ap.add_argument('--neg', default='', help="negative prompts separated by '|' (auto: the shapes-grammar alternatives of --prompt)")
ap.add_argument('--negw', type=float, default=0.3)
ap.add_argument('--ce', type=float, default=0, help='softmax cross-entropy over prompt + negatives at this logit scale instead of weighted distances')
ap.add_argument('--blur', type=int, default=1, help='passes of the 5-tap binomial blur in the views (sigma = sqrt(passes))')
ap.add_argument('--pal', type=float, default=0, help='weight of the palette prior (squared distance of each pixel to the nearest shapes colour)')
ap.add_argument('--init', default='codes')
ap.add_argument('--sched', default='')
ap.add_argument('--cands', type=int, default=1)
ap.add_argument('--scenes', type=int, default=0, help='start from the best of N random shapes-world images (export of export_shapes_pairs in /tmp/shapes)')
ap.add_argument('--pick', type=int, default=0)
ap.add_argument('--iw', type=float, default=0, help='init weight: mse(z, z0) * iw / 2 pulls the latent back to its start')
ap.add_argument('--out', default='/tmp/proto/out.png')
a = ap.parse_args()
torch.manual_seed(a.seed)
cfg = OmegaConf.load(a.vq.replace('.safetensors', '.yaml'))
mod, cls = cfg.model.target.rsplit('.', 1)
vq = getattr(importlib.import_module(mod), cls)(**cfg.model.params)
vq.load_state_dict(load_file(a.vq), strict=False); vq.eval()
clip = CLIPModel.from_pretrained(a.clip).eval(); tok = CLIPTokenizer.from_pretrained(a.clip)
for p in list(vq.parameters()) + list(clip.parameters()): p.requires_grad_(False)
with torch.no_grad():
    t = clip.text_projection(clip.text_model(**tok([a.prompt], return_tensors='pt', padding=True)).pooler_output)
    t = F.normalize(t, dim=-1)
    negs = []
    if a.neg == 'auto':
        w = a.prompt.split(); SH = ['circle', 'square', 'triangle', 'diamond']
        COL = ['red', 'green', 'blue', 'yellow', 'orange', 'purple', 'white', 'black']
        k = [i for i, x in enumerate(w) if x in SH][0]
        negs = [' '.join(w[:k] + [s] + w[k + 1:]) for s in SH if s != w[k]]
        cols = [i for i, x in enumerate(w) if x in COL]
        if len(cols) == 2:
            w2 = list(w); w2[cols[0]], w2[cols[1]] = w[cols[1]], w[cols[0]]; negs.append(' '.join(w2))
    elif a.neg:
        negs = a.neg.split('|')
    tn = F.normalize(clip.text_projection(clip.text_model(**tok(negs, return_tensors='pt', padding=True)).pooler_output), dim=-1) if negs else None
    print('negatives:', negs)
cb = vq.quantize.embedding.weight
E = cb.shape[1]; res = cfg.model.params.ddconfig.resolution
f = 2 ** (len(cfg.model.params.ddconfig.ch_mult) - 1); h = res // f
mean = torch.tensor([0.48145467, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
PAL = torch.tensor([[220, 30, 30], [40, 170, 60], [40, 70, 220], [240, 220, 40], [245, 140, 20], [140, 50, 180], [245, 245, 245], [15, 15, 15]]).float().view(1, 8, 3) / 255
zmin, zmax = cb.min(0).values.view(1, E, 1, 1), cb.max(0).values.view(1, E, 1, 1)
def imgf(px):
    return clip.visual_projection(clip.vision_model(pixel_values=px).pooler_output)
def vqz(zz):
    zz = F.interpolate(zz, size=(h, h), mode='bilinear', align_corners=False) if zz.shape[-1] != h else zz
    x = zz.permute(0, 2, 3, 1)
    d = (x ** 2).sum(-1, keepdim=True) + (cb ** 2).sum(1) - 2 * x @ cb.T
    q = cb[d.argmin(-1)]
    q = x + (q - x).detach()
    return q.permute(0, 3, 1, 2)
def synth(zz):
    return ((vq.decode(vqz(zz)) + 1) / 2).clamp(0, 1)
def augment(img):
    n = a.cutn; x = img.expand(n, -1, -1, -1)
    if 'shift' in a.aug:
        th = torch.zeros(n, 2, 3); s = 1 + (torch.rand(n) * 0.3 - 0.1)
        th[:, 0, 0] = s; th[:, 1, 1] = s; th[:, :, 2] = torch.rand(n, 2) * 0.4 - 0.2
        grid = F.affine_grid(th, x.shape, align_corners=False)
        x = F.grid_sample(x, grid, padding_mode='border', align_corners=False)
    if 'blur' in a.aug:
        k = torch.tensor([1., 4, 6, 4, 1]); k = (k[:, None] * k[None]) / 256
        for _ in range(a.blur):
            x = F.conv2d(F.pad(x, (2, 2, 2, 2), mode='replicate'), k.view(1, 1, 5, 5).repeat(3, 1, 1, 1), groups=3)
    x = x + torch.rand(n, 1, 1, 1) * a.noise * torch.randn_like(x)
    return x
def init_z(g):
    idx = torch.randint(cb.shape[0], (g * g,))
    return cb[idx].T.reshape(1, E, g, g).clone()
def clean_loss(zz):
    with torch.no_grad():
        e = F.normalize(imgf((synth(zz) - mean) / std), dim=-1)
        return ((e - t).norm(dim=-1).div(2).arcsin().pow(2).mul(2)).item()
def run(z, steps, lr):
    z = z.detach().clone().requires_grad_(True)
    z0 = z.detach().clone()
    opt = torch.optim.Adam([z], lr=lr)
    for i in range(steps):
        img = synth(z)
        e = F.normalize(imgf((augment(img) - mean) / std), dim=-1)
        loss = ((e - t).norm(dim=-1).div(2).arcsin().pow(2).mul(2)).mean()
        tot = loss
        if tn is not None and a.ce:
            lg = a.ce * torch.cat([e @ t.T, e @ tn.T], 1)
            tot = tot + F.cross_entropy(lg, torch.zeros(len(e), dtype=torch.long))
        elif tn is not None:
            tot = tot - a.negw * ((e[:, None] - tn[None]).norm(dim=-1).div(2).arcsin().pow(2).mul(2)).mean()
        if a.iw:
            tot = tot + a.iw * (z - z0).pow(2).mean() / 2
        if a.tv:
            tot = tot + a.tv * ((img[..., 1:, :] - img[..., :-1, :]).pow(2).mean() + (img[..., 1:] - img[..., :-1]).pow(2).mean())
        if a.pal:
            x = img.permute(0, 2, 3, 1).reshape(-1, 1, 3)
            tot = tot + a.pal * ((x - PAL) ** 2).sum(-1).min(-1).values.mean()
        opt.zero_grad(); tot.backward(); opt.step()
        with torch.no_grad():
            z.copy_(torch.maximum(torch.minimum(z, zmax), zmin))
    return z.detach(), loss
t0 = time.time()
sched = [tuple(map(int, p.split(':'))) for p in a.sched.split(',')] if a.sched else [(a.coarse or h, a.steps)]
g0, s0 = sched[0]
if a.scenes:
    S = np.memmap('/tmp/shapes/train.u8', dtype=np.uint8, mode='r').reshape(-1, 64, 64, 3)
    pick = np.array(S[np.random.default_rng(a.seed).choice(len(S), a.scenes, replace=False)])
    x = torch.from_numpy(pick).float().permute(0, 3, 1, 2) / 255
    with torch.no_grad():
        e = F.normalize(imgf((x - mean) / std), dim=-1)
        l = (e - t).norm(dim=-1).div(2).arcsin().pow(2).mul(2)
        k = l.argmin().item()
        z = vq.quant_conv(vq.encoder(x[k:k + 1] * 2 - 1))
    Image.fromarray(pick[k]).save(a.out.replace('.png', '_init.png'))
    print(f"scene loss {l[k].item():.3f}")
    z, loss = run(z, s0, a.lr)
elif a.cands > 1:
    best = None
    for c in range(a.cands):
        zc, _ = run(init_z(g0), a.pick, a.lr)
        l = clean_loss(zc)
        if best is None or l < best[0]: best = (l, zc)
    z = best[1]; s0 -= a.pick
else:
    z = init_z(g0)
if not a.scenes:
    z, loss = run(z, s0, a.lr)
for g, st in sched[1:]:
    z = F.interpolate(z, size=(g, g), mode='bilinear', align_corners=False)
    z, loss = run(z, st, a.lr)
with torch.no_grad():
    img = synth(z)
    e = F.normalize(imgf((img - mean) / std), dim=-1)
    fl = ((e - t).norm(dim=-1).div(2).arcsin().pow(2).mul(2)).item()
Image.fromarray((img[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(a.out)
print(f"{a.out}: last loss {loss.item():.3f} clean {fl:.3f} {time.time()-t0:.1f}s")
