#!/usr/bin/env python3
"""Experiment (not used by CI): adversarial fine-tuning of the shipped CLIP in PyTorch. Every
--mine_every steps, --mine_n random single-shape captions get a short VQGAN+CLIP run against
the current CLIP (grids 2,4,8,16, --mine_steps steps each, jittered views); the last 32 such
images are extra negatives of the text-to-image softmax. --recon: share of the real images
replaced by their VQGAN reconstruction, so the CLIP cannot just reject the decoder's style.
Same data and evaluation as tools/clip_negatives_probe.py. Results: docs/generation_recipe.md.

  python tools/clip_adversarial_probe.py --steps 200 --out /tmp/adv/a1
"""
import os, sys, types, importlib
exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'clip_negatives_probe.py')).read().split("print('start'")[0].replace("ap.add_argument('--offset',type=int,default=0)","ap.add_argument('--offset',type=int,default=0); ap.add_argument('--mine_every',type=int,default=4); ap.add_argument('--mine_n',type=int,default=8); ap.add_argument('--mine_steps',type=int,default=2); ap.add_argument('--recon',type=float,default=0.5); ap.add_argument('--proc',type=int,default=0)"))
try:
    import pytorch_lightning.utilities.distributed
except ImportError:
    from pytorch_lightning.utilities import rank_zero_only
    m = types.ModuleType("pytorch_lightning.utilities.distributed"); m.rank_zero_only = rank_zero_only
    sys.modules["pytorch_lightning.utilities.distributed"] = m
from omegaconf import OmegaConf
from safetensors.torch import load_file
VQ=os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', 'weights', 'vqgan', 'shapes.safetensors')
cfg=OmegaConf.load(VQ.replace('.safetensors','.yaml')); mod,cls=cfg.model.target.rsplit('.',1)
vq=getattr(importlib.import_module(mod),cls)(**cfg.model.params); vq.load_state_dict(load_file(VQ),strict=False); vq.eval()
for p in vq.parameters(): p.requires_grad_(False)
cb=vq.quantize.embedding.weight; E=cb.shape[1]; h=32
zmin,zmax=cb.min(0).values.view(1,E,1,1),cb.max(0).values.view(1,E,1,1)
def vqz(zz):
    zz=F.interpolate(zz,size=(h,h),mode='bilinear',align_corners=False) if zz.shape[-1]!=h else zz
    x=zz.permute(0,2,3,1); d=(x**2).sum(-1,keepdim=True)+(cb**2).sum(1)-2*x@cb.T
    q=cb[d.argmin(-1)]; q=x+(q-x).detach(); return q.permute(0,3,1,2)
def synth(zz): return ((vq.decode(vqz(zz))+1)/2).clamp(0,1)
def jitter(x):
    n=x.shape[0]; th=torch.zeros(n,2,3); s=1+(torch.rand(n)*0.3-0.1)
    th[:,0,0]=s; th[:,1,1]=s; th[:,:,2]=torch.rand(n,2)*0.4-0.2
    x=F.grid_sample(x,F.affine_grid(th,x.shape,align_corners=False),padding_mode='border',align_corners=False)
    k=torch.tensor([1.,4,6,4,1]); k=(k[:,None]*k[None])/256
    return F.conv2d(F.pad(x,(2,2,2,2),mode='replicate'),k.view(1,1,5,5).repeat(3,1,1,1),groups=3)
def mine(cs):
    model.eval()
    for p in model.parameters(): p.requires_grad_(False)
    x,m=ids(cs)
    with torch.no_grad(): t=F.normalize(feats(model.get_text_features(input_ids=x,attention_mask=m)),dim=-1)
    n=len(cs); z=cb[torch.randint(cb.shape[0],(n*4,))].reshape(n,2,2,E).permute(0,3,1,2).clone()
    for g in (2,4,8,16):
        if z.shape[-1]!=g: z=F.interpolate(z,size=(g,g),mode='bilinear',align_corners=False)
        z=z.detach().requires_grad_(True); o=torch.optim.Adam([z],lr=0.3)
        for _ in range(a.mine_steps):
            img=synth(z); e=F.normalize(feats(model.get_image_features(pixel_values=(jitter(img)-MEAN)/STD)),dim=-1)
            loss=((e-t).norm(dim=-1).div(2).arcsin().pow(2).mul(2)).sum()
            o.zero_grad(); loss.backward(); o.step()
            with torch.no_grad(): z.copy_(torch.maximum(torch.minimum(z,zmax),zmin))
    with torch.no_grad(): img=synth(z)
    for p in model.parameters(): p.requires_grad_(True)
    model.train(); return (img.permute(0,2,3,1).numpy()*255).round().astype(np.uint8), loss.item()/n
def recon(u8):
    with torch.no_grad():
        x=torch.from_numpy(u8).float().permute(0,3,1,2)/127.5-1
        q,_,_=vq.encode(x); y=((vq.decode(q)+1)/2).clamp(0,1)
    return (y.permute(0,2,3,1).numpy()*255).round().astype(np.uint8)
single=[c for c in caps if ' and ' not in c and 'background' in c]
print('start',evaluate(),flush=True)
opt=torch.optim.AdamW(model.parameters(),lr=a.lr,weight_decay=0.01)
pool=[]; t0=time.time(); ml=0
for step in range(a.steps):
    if step%a.mine_every==0:
        im_,ml=mine([single[i] for i in rng.integers(len(single),size=a.mine_n)]); pool.extend(list(im_)); pool=pool[-32:]
    lr=a.lr*min(1,(step+1)/20)*(0.5*(1+math.cos(math.pi*step/a.steps)))
    for g in opt.param_groups: g['lr']=lr
    b=(step+a.offset)%(len(caps)//a.batch); sl=slice(b*a.batch,(b+1)*a.batch)
    imgs=np.array(train[sl]); cs=caps[sl]
    if a.recon>0:
        sel=rng.random(len(cs))<a.recon
        if sel.any(): imgs[sel]=recon(imgs[sel])
    d=np.stack(pool)
    if a.proc: d=np.concatenate([d,np.stack([distractor(imgs[i],cs[i]) for i in range(a.proc)])])
    negs=shape_negs(cs); x,m=ids(cs+negs)
    txt=F.normalize(feats(model.get_text_features(input_ids=x,attention_mask=m)),dim=-1)
    im=F.normalize(feats(model.get_image_features(pixel_values=px(np.concatenate([imgs,d])))),dim=-1)
    n=len(cs); sc=model.logit_scale.exp(); y=torch.arange(n)
    loss=(F.cross_entropy(sc*im[:n]@txt.t(),y)+F.cross_entropy(sc*txt[:n]@im.t(),y))/2
    opt.zero_grad(); loss.backward(); opt.step()
    with torch.no_grad(): model.logit_scale.clamp_(0,math.log(100))
    if (step+1)%25==0:
        with torch.no_grad(): sd=(txt[:n]@im[n:].t()).max(1).values; sp=(txt[:n]*im[:n]).sum(1)
        print(json.dumps({'step':step+1,'loss':round(loss.item(),4),'pos':round(sp.mean().item(),3),'maxadv':round(sd.mean().item(),3),'mineloss':round(ml,3),'s':round(time.time()-t0,1)}),flush=True)
print('end',evaluate(),flush=True)
model.save_pretrained(a.out)
for f in os.listdir(a.clip):
    if f not in ('model.safetensors','config.json') and not f.endswith('.jsonl') and os.path.isfile(os.path.join(a.clip,f)): shutil.copy(os.path.join(a.clip,f),a.out)
