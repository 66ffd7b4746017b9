#!/usr/bin/env python3
"""Experiment (not used by CI): adversarial (robust) fine-tuning of the shipped CLIP's image
tower in PyTorch, TeCoA-style (Mao et al. 2023): PGD within an L2 or L-inf ball of radius --eps
(pixels in [0, 1]) maximises the image-to-text cross-entropy of each image against its caption,
its shape-swapped captions and its colour-role-swapped caption (the text tower is frozen, so
the text embeddings the generator aims at do not move); the image tower is then trained on the
attacked images (weight 1 - --clean_w) and the clean ones (--clean_w). --recon: share of the
images replaced by their VQGAN reconstruction; --jit: share shown through the generator's
jitter view (zoom, shift, blur). Data: the exported batches of examples/export_shapes_pairs
(EXPORT_DIR=/tmp/shapes STEPS=300 BATCH=32). Evaluates zero-shot colour / shape / swap
accuracy on the 400 held-out images before and after, and robust shape accuracy under PGD at
--eps. Results: docs/generation_recipe.md ("Robust CLIP").

  python tools/clip_robust_probe.py --eps 1.0 --adv_steps 3 --steps 400 --out /tmp/rob/r1
  python tools/robust_gen_eval.py --clip /tmp/rob/r1
"""
import argparse, json, math, os, sys, time, types, shutil, importlib
import numpy as np, torch, torch.nn.functional as F
from transformers import CLIPModel, CLIPTokenizer
MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
STD = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
COLS = ['red', 'green', 'blue', 'yellow', 'orange', 'purple', 'white', 'black']
SHAPES = ['circle', 'square', 'triangle', 'diamond']
HERE = os.path.dirname(os.path.abspath(__file__))
ap = argparse.ArgumentParser()
ap.add_argument('--clip', default=os.path.join(HERE, '..', 'weights', 'clip'))
ap.add_argument('--data', default='/tmp/shapes')
ap.add_argument('--steps', type=int, default=400); ap.add_argument('--batch', type=int, default=32)
ap.add_argument('--lr', type=float, default=1e-4); ap.add_argument('--out', default='/tmp/rob/r1')
ap.add_argument('--eps', type=float, default=1.0); ap.add_argument('--adv_steps', type=int, default=3)
ap.add_argument('--norm', default='l2', choices=['l2', 'linf'])
ap.add_argument('--clean_w', type=float, default=0.3)
ap.add_argument('--recon', type=float, default=0.25); ap.add_argument('--jit', type=float, default=0.5)
ap.add_argument('--seed', type=int, default=0); ap.add_argument('--offset', type=int, default=0)
ap.add_argument('--eval_n', type=int, default=400)
a = ap.parse_args(); torch.manual_seed(a.seed); rng = np.random.default_rng(a.seed)
torch.set_num_threads(1)  # 2 threads thrash on the shared 2-core machine (29 s a step against 1.5 s)
tok = CLIPTokenizer.from_pretrained(a.clip); model = CLIPModel.from_pretrained(a.clip)
for p in model.parameters(): p.requires_grad_(False)
vis = list(model.vision_model.parameters()) + list(model.visual_projection.parameters())
for p in vis: p.requires_grad_(True)
S = 64
train = np.memmap(os.path.join(a.data, 'train.u8'), dtype=np.uint8, mode='r').reshape(-1, S, S, 3)
caps = open(os.path.join(a.data, 'train.txt')).read().splitlines()
ev_img = np.fromfile(os.path.join(a.data, 'eval.u8'), dtype=np.uint8).reshape(-1, S, S, 3)[:a.eval_n]
ev = json.load(open(os.path.join(a.data, 'eval.json')))[:a.eval_n]

def ids(t):
    r = tok(t, padding='max_length', max_length=16, truncation=True, return_tensors='pt'); return r.input_ids, r.attention_mask
def to01(u8): return torch.from_numpy(np.ascontiguousarray(u8)).float().permute(0, 3, 1, 2) / 255.
def feats(o): return o if torch.is_tensor(o) else o.pooler_output  # transformers 5 returns an output object
def imf(x01): return F.normalize(feats(model.get_image_features(pixel_values=(x01 - MEAN) / STD)), dim=-1)
@torch.no_grad()
def txtf(texts):
    out = []
    for i in range(0, len(texts), 256):
        x, m = ids(texts[i:i + 256]); out.append(feats(model.get_text_features(input_ids=x, attention_mask=m)))
    return F.normalize(torch.cat(out), dim=-1)
def negatives(cs):
    neg = []; batch = set(cs)
    for c in cs:
        w = c.split(); k = next(i for i, x in enumerate(w) if x in SHAPES)
        cand = [' '.join(w[:k] + [s] + w[k + 1:]) for s in SHAPES if s != w[k]]
        cols = [i for i, x in enumerate(w) if x in COLS]
        if 'background' in w and ' and ' not in c and len(cols) == 2:
            w2 = list(w); w2[cols[0]], w2[cols[1]] = w[cols[1]], w[cols[0]]; cand.append(' '.join(w2))
        neg += [n for n in cand if n not in batch and n not in neg]
    return neg
def project(d):
    if a.norm == 'linf': return d.clamp(-a.eps, a.eps)
    n = d.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
    return d * (a.eps / n).clamp(max=1)
def pgd(x, txt, y, scale, steps):
    """The perturbation of x (in [0, 1]) within the ball that most raises CE(scale * img @ txt^T, y)."""
    d = project(torch.randn_like(x) * a.eps / (math.sqrt(x[0].numel()) if a.norm == 'l2' else 2))
    alpha = 2.5 * a.eps / max(steps, 1)
    for _ in range(steps):
        d = d.detach().requires_grad_(True)
        l = F.cross_entropy(scale * imf((x + d).clamp(0, 1)) @ txt.t(), y)
        g, = torch.autograd.grad(l, d)
        with torch.no_grad():
            if a.norm == 'linf': d = d + alpha * g.sign()
            else: d = d + alpha * g / g.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
            d = project(d); d = (x + d).clamp(0, 1) - x
    return d.detach()
# The VQGAN (for reconstructions), loaded as tools/generation_recipe_probe.py does.
try:
    import pytorch_lightning.utilities.distributed
except ImportError:
    from pytorch_lightning.utilities import rank_zero_only
    m_ = types.ModuleType('pytorch_lightning.utilities.distributed'); m_.rank_zero_only = rank_zero_only
    sys.modules['pytorch_lightning.utilities.distributed'] = m_
# taming.util imports requests only to download LPIPS weights, which loading never needs
sys.modules.setdefault('requests', types.ModuleType('requests'))
from omegaconf import OmegaConf
from safetensors.torch import load_file
VQ = os.path.join(HERE, '..', 'weights', 'vqgan', 'shapes.safetensors')
cfg = OmegaConf.load(VQ.replace('.safetensors', '.yaml')); mod, cls = cfg.model.target.rsplit('.', 1)
vq = getattr(importlib.import_module(mod), cls)(**cfg.model.params); vq.load_state_dict(load_file(VQ), strict=False); vq.eval()
for p in vq.parameters(): p.requires_grad_(False)
@torch.no_grad()
def recon(x01):
    q, _, _ = vq.encode(x01 * 2 - 1); return ((vq.decode(q) + 1) / 2).clamp(0, 1)
def jitter(x):
    n = x.shape[0]; th = torch.zeros(n, 2, 3); s = 1 + (torch.rand(n) * 0.3 - 0.1)
    th[:, 0, 0] = s; th[:, 1, 1] = s; th[:, :, 2] = torch.rand(n, 2) * 0.2 - 0.1
    x = F.grid_sample(x, F.affine_grid(th, x.shape, align_corners=False), padding_mode='border', align_corners=False)
    k = torch.tensor([1., 4, 6, 4, 1]); k = (k[:, None] * k[None]) / 256
    return F.conv2d(F.pad(x, (2, 2, 2, 2), mode='replicate'), k.view(1, 1, 5, 5).repeat(3, 1, 1, 1), groups=3)

def evaluate(robust=True):
    model.eval()
    texts = sorted({c for e in ev for c in e['colour'] + e['shape']}); index = {t: i for i, t in enumerate(texts)}
    tf = txtf(texts); x = to01(ev_img)
    with torch.no_grad(): im = torch.cat([imf(x[i:i + 100]) for i in range(0, len(x), 100)])
    col = sum(int(torch.argmax(tf[[index[c] for c in e['colour']]] @ im[k]) == e['colour_idx']) for k, e in enumerate(ev))
    shp = sum(int(torch.argmax(tf[[index[c] for c in e['shape']]] @ im[k]) == e['shape_idx']) for k, e in enumerate(ev))
    out = {'colour': col / len(ev), 'shape': shp / len(ev)}
    if robust and a.eps > 0:
        # robust shape accuracy: PGD (10 steps) against the 4 shape captions of each image
        hit = 0; sc = model.logit_scale.exp().item()
        for i in range(0, len(ev), 50):
            es = ev[i:i + 50]; xs = x[i:i + 50]
            t4 = torch.stack([tf[[index[c] for c in e['shape']]] for e in es])  # [B,4,P]
            y = torch.tensor([e['shape_idx'] for e in es])
            d = torch.zeros_like(xs); alpha = 2.5 * a.eps / 10
            for _ in range(10):
                d = d.detach().requires_grad_(True)
                lg = sc * torch.einsum('bp,bkp->bk', imf((xs + d).clamp(0, 1)), t4)
                g, = torch.autograd.grad(F.cross_entropy(lg, y), d)
                with torch.no_grad():
                    d = d + (alpha * g.sign() if a.norm == 'linf' else alpha * g / g.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1))
                    d = project(d); d = (xs + d).clamp(0, 1) - xs
            with torch.no_grad():
                lg = torch.einsum('bp,bkp->bk', imf((xs + d).clamp(0, 1)), t4)
            hit += int((lg.argmax(1) == y).sum())
        out['robust_shape'] = hit / len(ev)
    model.train(); return out

print('start', json.dumps(evaluate()), flush=True)
opt = torch.optim.AdamW(vis, lr=a.lr, weight_decay=0.01)
t0 = time.time(); nb = len(caps) // a.batch
for step in range(a.steps):
    lr = a.lr * min(1, (step + 1) / 20) * (0.5 * (1 + math.cos(math.pi * step / a.steps)))
    for g in opt.param_groups: g['lr'] = lr
    b = (step + a.offset) % nb; sl = slice(b * a.batch, (b + 1) * a.batch)
    x = to01(np.array(train[sl])); cs = caps[sl]; n = len(cs)
    sel = torch.from_numpy(rng.random(n) < a.recon)
    if sel.any(): x[sel] = recon(x[sel])
    sel = torch.from_numpy(rng.random(n) < a.jit)
    if sel.any(): x[sel] = jitter(x[sel])
    txt = txtf(cs + negatives(cs)); y = torch.arange(n); sc = model.logit_scale.exp().detach()
    model.eval(); d = pgd(x, txt, y, sc, a.adv_steps) if a.eps > 0 else torch.zeros_like(x); model.train()
    la = F.cross_entropy(sc * imf((x + d).clamp(0, 1)) @ txt.t(), y)
    lc = F.cross_entropy(sc * imf(x) @ txt.t(), y) if a.clean_w > 0 else torch.zeros(())
    loss = a.clean_w * lc + (1 - a.clean_w) * la
    opt.zero_grad(); loss.backward(); opt.step()
    if (step + 1) % 25 == 0:
        print(json.dumps({'step': step + 1, 'adv': round(la.item(), 4), 'clean': round(lc.item(), 4), 'lr': lr, 's': round(time.time() - t0, 1)}), flush=True)
print('end', json.dumps(evaluate()), flush=True)
model.save_pretrained(a.out)
for f in os.listdir(a.clip):
    if f not in ('model.safetensors', 'config.json') and not f.endswith('.jsonl') and os.path.isfile(os.path.join(a.clip, f)): shutil.copy(os.path.join(a.clip, f), a.out)
