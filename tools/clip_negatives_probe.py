#!/usr/bin/env python3
"""Experiment (not used by CI, not the shipped training): fine-tune the shipped CLIP in PyTorch
with extra negatives, to test whether a more robust CLIP makes `vqclip generate` draw cleaner
shapes. Results: docs/generation_recipe.md ("Robustness experiments").

Data: batches exported from vqclip's generator,
  EXPORT_DIR=/tmp/shapes STEPS=600 BATCH=32 cargo test --release export_shapes_pairs -- --ignored
Negatives: shape-swapped captions (as --shape-negatives, minus batch captions), colour-role
swapped captions (--swap 1: "a red circle on a blue background" vs "a blue circle on a red
background"), and with --w 1 procedural distractor images (--kinds blobs,patch,patch3,texture:
scattered blobs, patchworks, textures in the pair's colours) as extra columns of the
text-to-image softmax. Evaluation: zero-shot colour, shape and colour-role-swap accuracy on
the 400 exported held-out images.

  python tools/clip_negatives_probe.py --steps 300 --out /tmp/adv/c1
  python tools/generation_recipe_probe.py --clip /tmp/adv/c1 ...
"""
import argparse, json, math, os, time, random, shutil
import numpy as np, torch, torch.nn.functional as F
from transformers import CLIPModel, CLIPTokenizer
MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
STD = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
PAL={'red':[220,30,30],'green':[40,170,60],'blue':[40,70,220],'yellow':[240,220,40],'orange':[245,140,20],'purple':[140,50,180],'white':[245,245,245],'black':[15,15,15]}
NAMES=list(PAL); P=np.array([PAL[n] for n in NAMES],np.float32)
SHAPES=['circle','square','triangle','diamond']
ap=argparse.ArgumentParser()
ap.add_argument('--clip',default=os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', 'weights', 'clip')); ap.add_argument('--data',default='/tmp/shapes')
ap.add_argument('--steps',type=int,default=300); ap.add_argument('--batch',type=int,default=32)
ap.add_argument('--lr',type=float,default=3e-4); ap.add_argument('--out',default='/tmp/adv/c1')
ap.add_argument('--kinds',default='blobs,patch,patch3,texture'); ap.add_argument('--nd',type=int,default=1)
ap.add_argument('--w',type=float,default=1.0); ap.add_argument('--seed',type=int,default=0)
ap.add_argument('--offset',type=int,default=0); ap.add_argument('--swap',type=int,default=1)
a=ap.parse_args(); torch.manual_seed(a.seed); rng=np.random.default_rng(a.seed)
torch.set_num_threads(2)
tok=CLIPTokenizer.from_pretrained(a.clip); model=CLIPModel.from_pretrained(a.clip); model.train()
S=64
train=np.memmap(os.path.join(a.data,"train.u8"),dtype=np.uint8,mode="r").reshape(-1,S,S,3)
caps=open(os.path.join(a.data,"train.txt")).read().splitlines()
ev_img=np.fromfile(os.path.join(a.data,"eval.u8"),dtype=np.uint8).reshape(-1,S,S,3); ev=json.load(open(os.path.join(a.data,"eval.json")))
def feats(o): return o if torch.is_tensor(o) else o.pooler_output
def px(u8): return (torch.from_numpy(np.ascontiguousarray(u8)).float().permute(0,3,1,2)/255.-MEAN)/STD
def ids(t):
    r=tok(t,padding="max_length",max_length=16,truncation=True,return_tensors="pt"); return r.input_ids,r.attention_mask
def up(g, n):
    t=torch.from_numpy(g).float()[None,None]; return F.interpolate(t,size=(n,n),mode='bilinear',align_corners=False)[0,0].numpy()
def distractor(img, cap):
    words=cap.split(); fg=next(w for w in words if w in PAL)
    border=np.concatenate([img[0],img[-1],img[:,0],img[:,-1]]).astype(np.float32)
    lab=((border[:,None]-P[None])**2).sum(-1).argmin(-1); bg=NAMES[np.bincount(lab,minlength=8).argmax()]
    if bg==fg: bg=NAMES[(NAMES.index(fg)+1)%8]
    kind=rng.choice(a.kinds.split(','))
    out=np.empty((S,S,3),np.float32); out[:]=PAL[bg]
    yy,xx=np.mgrid[0:S,0:S]+0.5
    if kind=='blobs':
        for _ in range(rng.integers(3,12)):
            cx,cy=rng.uniform(0,S,2); r=rng.uniform(2,8); ar=rng.uniform(0.5,2)
            m=((xx-cx)/r)**2+((yy-cy)/(r*ar))**2<1; out[m]=PAL[fg]
    elif kind in ('patch','patch3','blob1'):
        g=int(rng.choice([2,3,4,6,8])) if kind!='blob1' else int(rng.choice([3,4]))
        f=up(rng.random((g,g)),S); q=rng.uniform(0.3,0.8) if kind!='blob1' else rng.uniform(0.75,0.92)
        m=f>np.quantile(f,q); out[m]=PAL[fg]
        if kind=='patch3':
            third=NAMES[rng.integers(8)]; f2=up(rng.random((g,g)),S); m2=(f2>np.quantile(f2,rng.uniform(0.5,0.85)))
            out[m2]=PAL[third]
    elif kind=='texture':
        g=int(rng.choice([8,16,32])); f=up(rng.random((g,g)),S)
        mask=f>rng.uniform(0.4,0.7); region=up(rng.random((3,3)),S)>0.5
        out[mask&region]=PAL[fg]
    out+=rng.normal(0,rng.uniform(0,10),out.shape)
    return np.clip(out,0,255).astype(np.uint8)
def shape_negs(cs):
    neg=[]; batch=set(cs)
    for c in cs:
        w=c.split(); k=next(i for i,x in enumerate(w) if x in SHAPES)
        for s in SHAPES:
            if s==w[k]: continue
            n=' '.join(w[:k]+[s]+w[k+1:])
            if n not in batch and n not in neg: neg.append(n)
        if a.swap and 'background' in w and ' and ' not in c:
            cols=[i for i,x in enumerate(w) if x in PAL]
            if len(cols)==2:
                w2=list(w); w2[cols[0]],w2[cols[1]]=w[cols[1]],w[cols[0]]; n=' '.join(w2)
                if n not in batch and n not in neg: neg.append(n)
    return neg
@torch.no_grad()
def evaluate():
    model.eval(); texts=sorted({c for e in ev for c in e["colour"]+e["shape"]}); index={t:i for i,t in enumerate(texts)}
    tf=[]
    for i in range(0,len(texts),256):
        x,m=ids(texts[i:i+256]); tf.append(feats(model.get_text_features(input_ids=x,attention_mask=m)))
    tf=F.normalize(torch.cat(tf),dim=-1)
    im=F.normalize(torch.cat([feats(model.get_image_features(pixel_values=px(ev_img[i:i+100]))) for i in range(0,len(ev_img),100)]),dim=-1)
    col=shp=0
    for k,e in enumerate(ev):
        s=tf@im[k]
        col+=int(torch.argmax(s[[index[c] for c in e["colour"]]])==e["colour_idx"]); shp+=int(torch.argmax(s[[index[c] for c in e["shape"]]])==e["shape_idx"])
    sw=[];
    for k,e in enumerate(ev):
        c=e['colour'][e['colour_idx']]; w=c.split(); cols=[i for i,x in enumerate(w) if x in PAL]
        if len(cols)<2: continue
        w2=list(w); w2[cols[0]],w2[cols[1]]=w[cols[1]],w[cols[0]]; sw.append((k,c,' '.join(w2)))
    x,m=ids([q for _,c,d in sw for q in (c,d)]); t2=F.normalize(feats(model.get_text_features(input_ids=x,attention_mask=m)),dim=-1).view(len(sw),2,-1)
    swa=sum(int((t2[i,0]@im[k])>(t2[i,1]@im[k])) for i,(k,_,_) in enumerate(sw))/len(sw)
    model.train(); return col/len(ev),shp/len(ev),swa
print('start',evaluate(),flush=True)
opt=torch.optim.AdamW(model.parameters(),lr=a.lr,weight_decay=0.01)
t0=time.time()
for step in range(a.steps):
    lr=a.lr*min(1,(step+1)/20)*(0.5*(1+math.cos(math.pi*step/a.steps)))
    for g in opt.param_groups: g['lr']=lr
    b=(step+a.offset)%(len(caps)//a.batch); sl=slice(b*a.batch,(b+1)*a.batch)
    imgs=np.array(train[sl]); cs=caps[sl]
    d=np.stack([distractor(imgs[i],cs[i]) for i in range(len(cs)) for _ in range(a.nd)])
    negs=shape_negs(cs)
    x,m=ids(cs+negs)
    txt=F.normalize(feats(model.get_text_features(input_ids=x,attention_mask=m)),dim=-1)
    im=F.normalize(feats(model.get_image_features(pixel_values=px(np.concatenate([imgs,d])))),dim=-1)
    n=len(cs); sc=model.logit_scale.exp()
    y=torch.arange(n)
    li=F.cross_entropy(sc*im[:n]@txt.t(),y)
    lt=F.cross_entropy(sc*txt[:n]@im.t(),y) if a.w>0 else F.cross_entropy(sc*txt[:n]@im[:n].t(),y)
    loss=(li+lt)/2
    opt.zero_grad(); loss.backward(); opt.step()
    with torch.no_grad(): model.logit_scale.clamp_(0,math.log(100))
    if (step+1)%50==0:
        with torch.no_grad():
            sd=(txt[:n]@im[n:].t()).max(1).values; sp=(txt[:n]*im[:n]).sum(1)
        print(json.dumps({'step':step+1,'loss':round(loss.item(),4),'pos':round(sp.mean().item(),3),'maxdist':round(sd.mean().item(),3),'s':round(time.time()-t0,1)}),flush=True)
print('end',evaluate(),flush=True)
model.save_pretrained(a.out)
for f in os.listdir(a.clip):
    if f not in ('model.safetensors','config.json') and not f.endswith('.jsonl') and os.path.isfile(os.path.join(a.clip,f)): shutil.copy(os.path.join(a.clip,f),a.out)
