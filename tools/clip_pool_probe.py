#!/usr/bin/env python3
"""How often a shapes CLIP ranks a right scene first in a pool of random shapes-world scenes
(not used by CI): a PyTorch simulation of the ranking step of `vqclip generate --init
scenes:N`, with its own renderer of the same geometry and colours (random numbers differ
from vqclip's; pools here are random scenes, not vqclip's covering pools).

For 5 prompts and P pools of 512 random scenes it counts pools whose best-ranked scene has
the prompt's background and a shape of its kind and colour ("raw": cosine; "dual": cosine
minus a log-sum-exp over the 224 'a C S on a B background' captions), and pools that hold
such a scene at all ("avail").

    /work/pyenv/bin/python tools/clip_pool_probe.py weights/clip 20
"""
import torch, numpy as np, torch.nn.functional as F, sys
from transformers import CLIPModel, CLIPTokenizer
torch.set_num_threads(1)
d = sys.argv[1] if len(sys.argv) > 1 else "weights/clip"; NP = int(sys.argv[2]) if len(sys.argv) > 2 else 20
clip = CLIPModel.from_pretrained(d).eval(); tok = CLIPTokenizer.from_pretrained(d)
PAL={'red':[220,30,30],'green':[40,170,60],'blue':[40,70,220],'yellow':[240,220,40],'orange':[245,140,20],'purple':[140,50,180],'white':[245,245,245],'black':[15,15,15]}
COL=list(PAL); SH=['circle','square','triangle','diamond']
POS=[(0.5,0.5),(0.28,0.28),(0.72,0.28),(0.28,0.72),(0.72,0.72)]
g=(np.arange(64*4)+0.5)/(64*4); X,Y=np.meshgrid(g,g)
def inside(k,dx,dy):
    if k=='circle': return dx*dx+dy*dy<=1
    if k=='square': return (abs(dx)<=0.85)&(abs(dy)<=0.85)
    if k=='triangle': return (dy>=-1)&(dy<=0.8)&(abs(dx)<=(dy+1)/1.8)
    return abs(dx)+abs(dy)<=1
def render(bg,shapes):
    img=np.zeros((256,256,3)); img[:]=PAL[bg]
    for k,c,large,p in shapes:
        h=0.3 if large else 0.16; m=inside(k,(X-POS[p][0])/h,(Y-POS[p][1])/h); img[m]=PAL[c]
    return img.reshape(64,4,64,4,3).mean((1,3))
def rand_scene(r):
    bg=COL[r.integers(8)]; n=2 if r.integers(4)==0 else 1; sh=[]
    while len(sh)<n:
        c=COL[r.integers(8)]
        if c==bg: continue
        p=r.integers(5) if n==1 else 1+r.integers(4)
        if any(s[3]==p for s in sh): continue
        sh.append((SH[r.integers(4)],c,n==1 and r.integers(2)==0,p))
    return bg,sh
mean = torch.tensor([0.48145467, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
def T(ps):
    with torch.no_grad(): return F.normalize(clip.text_projection(clip.text_model(**tok(ps, return_tensors='pt',padding=True)).pooler_output), dim=-1)
bank=[f"a {c} {s} on a {b} background" for c in COL for s in SH for b in COL if b!=c]
tb=T(bank); scale=clip.logit_scale.exp().item()
cases=[("red","circle","blue"),("yellow","square","black"),("white","triangle","green"),("green","diamond","purple"),("blue","circle","yellow")]
res={c:{'raw':0,'dual':0,'avail':0} for c in cases}
for t in range(NP):
    r=np.random.default_rng(1000+t)
    scenes=[rand_scene(r) for _ in range(512)]
    x=torch.from_numpy(np.stack([render(*s) for s in scenes])).float().permute(0,3,1,2)/255
    with torch.no_grad(): e=F.normalize(clip.visual_projection(clip.vision_model(pixel_values=(x-mean)/std).pooler_output), dim=-1)
    lse=torch.logsumexp(scale*(e@tb.T),1)/scale
    for (c,k,b) in cases:
        ok=lambda s: s[0]==b and any(q[0]==k and q[1]==c for q in s[1])
        res[(c,k,b)]['avail']+=any(ok(s) for s in scenes)
        sim=(e@T([f"a {c} {k} on a {b} background"]).T)[:,0]
        res[(c,k,b)]['raw']+=ok(scenes[sim.argmax()])
        res[(c,k,b)]['dual']+=ok(scenes[(sim-lse).argmax()])
for c,v in res.items(): print(c,v)
