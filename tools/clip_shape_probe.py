#!/usr/bin/env python3
"""Supervised probe of the shapes CLIP image tower (transformers CLIPVisionModel from
weights/clip/config.json + a linear head): can it learn the shape kind (4-way) of the
single-shape images exported by the ignored test export_shapes_pairs? Used to show that the
shape plateau is the task, not vqclip.

  python tools/clip_shape_probe.py PATCH LR [rgb|mask] STEPS   (BG=black: black backgrounds only;
                                                               WARMUP=N: linear lr warm-up;
                                                               CURR=mask:N foreground masks for the first N
                                                               steps, then RGB; CURR=ramp:N blend mask->RGB)
"""
import json, math, os, sys, time
import numpy as np, torch
from transformers import CLIPConfig, CLIPVisionModel
torch.set_num_threads(2); torch.manual_seed(0)
S=64; D=os.environ.get("DATA", "/tmp/shapes")
cfg = CLIPConfig.from_pretrained(os.environ.get("CLIP", "weights/clip")).vision_config
if len(sys.argv) > 1: cfg.patch_size = int(sys.argv[1])
LR = float(sys.argv[2]) if len(sys.argv) > 2 else 1e-3
MASK = len(sys.argv) > 3 and sys.argv[3] == "mask"
STEPS = int(sys.argv[4]) if len(sys.argv) > 4 else 1500
m = CLIPVisionModel(cfg); head = torch.nn.Linear(cfg.hidden_size, 4)
train = np.memmap(f"{D}/train.u8", dtype=np.uint8, mode="r").reshape(-1,S,S,3)
caps = open(f"{D}/train.txt").read().splitlines()
kinds = ["circle","square","triangle","diamond"]
idx = [i for i,c in enumerate(caps) if " and " not in c]
BG = os.environ.get("BG")  # keep only images whose corner pixel is this colour ("black")
if BG:
    ref = {"black": (15,15,15), "white": (245,245,245)}[BG]
    idx = [i for i in idx if np.abs(train[i,0,0].astype(int) - ref).max() < 40]
    print("subset", len(idx), flush=True)
lab = [next(k for k,w in enumerate(kinds) if w in caps[i].split()) for i in idx]
ev = json.load(open(f"{D}/eval.json")); ev_img = np.fromfile(f"{D}/eval.u8",dtype=np.uint8).reshape(-1,S,S,3)
ev_lab = torch.tensor([e["shape_idx"] for e in ev])
MEAN=torch.tensor([0.48145466,0.4578275,0.40821073]).view(1,3,1,1); STD=torch.tensor([0.26862954,0.26130258,0.27577711]).view(1,3,1,1)
CURR=os.environ.get("CURR","")
def px(u, step=10**9):
    x = torch.from_numpy(np.array(u)).float().permute(0,3,1,2)/255
    if CURR:
        kind,n=CURR.split(":"); n=int(n)
        d = (x - x[:, :, :1, :1]).norm(dim=1, keepdim=True)
        mk = (d > 0.25).float().expand(-1, 3, -1, -1)
        a = (0.0 if step<n else 1.0) if kind=="mask" else min(1.0, step/n)
        x = a*x + (1-a)*mk
    elif MASK:  # foreground mask (distance from the corner pixel's colour), as grey
        d = (x - x[:, :, :1, :1]).norm(dim=1, keepdim=True)
        x = (d > 0.25).float().expand(-1, 3, -1, -1)
    return (x-MEAN)/STD
opt=torch.optim.AdamW(list(m.parameters())+list(head.parameters()), lr=LR, weight_decay=0.01)
WARM = int(os.environ.get("WARMUP", "0"))
sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / WARM) if WARM else 1.0)
B=32; t0=time.time()
for step in range(STEPS):
    j = np.arange(step*B, step*B+B) % len(idx)
    x = px(train[[idx[k] for k in j]], step); y = torch.tensor([lab[k] for k in j])
    loss = torch.nn.functional.cross_entropy(head(m(pixel_values=x).pooler_output), y)
    opt.zero_grad(); loss.backward(); opt.step(); sched.step()
    if (step+1) % 100 == 0:
        with torch.no_grad():
            m.eval(); p = head(m(pixel_values=px(ev_img)).pooler_output).argmax(1); m.train()
        print(json.dumps({"step":step+1,"loss":round(loss.item(),3),"eval_shape":(p==ev_lab).float().mean().item(),"s":round(time.time()-t0)}),flush=True)
