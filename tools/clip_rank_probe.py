#!/usr/bin/env python3
"""Text-to-image ranking of a shapes CLIP (not used by CI): where the images that match a
prompt land when CLIP ranks a pool of shapes-world images against it, as `vqclip generate`'s
`--init scenes:N` start does.

Data: training images and captions exported from vqclip's generator,
  EXPORT_DIR=/tmp/shapes STEPS=600 BATCH=32 cargo test --release export_shapes_pairs -- --ignored
For each prompt it prints the ranks of the first 4096 images whose caption is that exact
one-shape scene (same shape, colour and background; any size, position or phrasing), by raw
cosine ("raw") and by cosine minus a log-sum-exp over the 224 "a C S on a B background"
captions ("dual"), with the three best images' captions.

    /work/pyenv/bin/python tools/clip_rank_probe.py weights/clip
"""
import sys
import numpy as np, torch, torch.nn.functional as F
from transformers import CLIPModel, CLIPTokenizer
torch.set_num_threads(2)
clip_dir = sys.argv[1] if len(sys.argv) > 1 else 'weights/clip'
data = sys.argv[2] if len(sys.argv) > 2 else '/tmp/shapes'
clip = CLIPModel.from_pretrained(clip_dir).eval(); tok = CLIPTokenizer.from_pretrained(clip_dir)
S = np.memmap(f'{data}/train.u8', dtype=np.uint8, mode='r').reshape(-1, 64, 64, 3)
caps = open(f'{data}/train.txt').read().splitlines()
N = 4096
x = torch.from_numpy(np.array(S[:N])).float().permute(0, 3, 1, 2) / 255
mean = torch.tensor([0.48145467, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
COL = ['red', 'green', 'blue', 'yellow', 'orange', 'purple', 'white', 'black']
SH = ['circle', 'square', 'triangle', 'diamond']
bank = [f"a {c} {s} on a {b} background" for c in COL for s in SH for b in COL if b != c]
def T(ps):
    with torch.no_grad():
        return F.normalize(clip.text_projection(clip.text_model(**tok(ps, return_tensors='pt', padding=True)).pooler_output), dim=-1)
tb = T(bank); scale = clip.logit_scale.exp().item()
with torch.no_grad():
    e = F.normalize(clip.visual_projection(clip.vision_model(pixel_values=(x - mean) / std).pooler_output), dim=-1)
for s, c, b in [("red", "circle", "blue"), ("yellow", "square", "black"), ("white", "triangle", "green"),
                ("green", "diamond", "purple"), ("orange", "circle", "white"), ("blue", "square", "yellow")]:
    p = f"a {s} {c} on a {b} background"
    sim = (e @ T([p]).T)[:, 0]
    lse = torch.logsumexp(scale * (e @ tb.T), 1) / scale
    match = [i for i in range(N) if f"{s} {c}" in caps[i] and f"{b} background" in caps[i] and " and " not in caps[i]]
    for name, sc in [("raw", sim), ("dual", sim - lse)]:
        order = sc.argsort(descending=True)
        ranks = sorted((order == i).nonzero().item() for i in match)
        print(f"{p} [{name}] {len(match)} matches, ranks {ranks[:6]}; best: {[caps[order[r]] for r in range(3)]}")
