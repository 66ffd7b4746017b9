#!/usr/bin/env python3
"""Peer trainer for `vqclip train clip`: the same architecture (transformers CLIPModel built
from a config like weights/clip/config.json), loss (symmetric contrastive, learned
temperature clamped to ln 100), optimiser (AdamW, weight decay 0.01, warm-up 5%, cosine to
5%) and data (batches exported from the Rust generator by the ignored test
`export_shapes_pairs`), and the zero-shot colour/shape evaluation of `vqclip eval clip`.
Used to tell a vqclip training bug from a hard task. CPU is enough.

  EXPORT_DIR=/tmp/shapes STEPS=600 BATCH=32 cargo test --release export_shapes_pairs -- --ignored
  python tools/clip_shapes_peer.py --data /tmp/shapes --steps 2000 --batch 32 --lr 1e-3
"""
import argparse, json, math, os, time
import numpy as np
import torch
from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
STD = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)

ap = argparse.ArgumentParser()
ap.add_argument("--data", default="/tmp/shapes")
ap.add_argument("--clip", default="weights/clip", help="folder with config.json + tokenizer")
ap.add_argument("--steps", type=int, default=2000)
ap.add_argument("--batch", type=int, default=32)
ap.add_argument("--lr", type=float, default=1e-3)
ap.add_argument("--wd", type=float, default=0.01)
ap.add_argument("--size", type=int, default=64)
ap.add_argument("--patch", type=int, default=None)
ap.add_argument("--width", type=int, default=None)
ap.add_argument("--vision-layers", type=int, default=None)
ap.add_argument("--eval-every", type=int, default=250)
ap.add_argument("--seed", type=int, default=0)
ap.add_argument("--threads", type=int, default=2)
ap.add_argument("--no-hard-negatives", action="store_true",
                help="drop the odd pair of every hard-negative pair (half the batch)")
args = ap.parse_args()
torch.set_num_threads(args.threads)
torch.manual_seed(args.seed)

tok = CLIPTokenizer.from_pretrained(args.clip)
cfg = CLIPConfig.from_pretrained(args.clip)
cfg.text_config.max_position_embeddings = 20
cfg.text_config.vocab_size = len(tok)
if args.patch:
    cfg.vision_config.patch_size = args.patch
if args.width:
    cfg.vision_config.hidden_size = args.width
    cfg.vision_config.intermediate_size = 4 * args.width
if args.vision_layers:
    cfg.vision_config.num_hidden_layers = args.vision_layers
model = CLIPModel(cfg)
n_params = sum(p.numel() for p in model.parameters())

S = args.size
train = np.memmap(os.path.join(args.data, "train.u8"), dtype=np.uint8, mode="r").reshape(-1, S, S, 3)
caps = open(os.path.join(args.data, "train.txt")).read().splitlines()
assert len(caps) == len(train)
ev_img = np.fromfile(os.path.join(args.data, "eval.u8"), dtype=np.uint8).reshape(-1, S, S, 3)
ev = json.load(open(os.path.join(args.data, "eval.json")))


def pixels(u8):
    x = torch.from_numpy(np.ascontiguousarray(u8)).float().permute(0, 3, 1, 2) / 255.0
    return (x - MEAN) / STD


def ids(texts):
    t = tok(texts, padding="max_length", max_length=20, truncation=True, return_tensors="pt")
    return t.input_ids, t.attention_mask


@torch.no_grad()
def evaluate():
    model.eval()
    texts = sorted({c for e in ev for c in e["colour"] + e["shape"]})
    index = {t: i for i, t in enumerate(texts)}
    tf = []
    for i in range(0, len(texts), 256):
        a, m = ids(texts[i:i + 256])
        tf.append(features(model.get_text_features(input_ids=a, attention_mask=m)))
    tf = torch.cat(tf)
    tf = tf / tf.norm(dim=-1, keepdim=True)
    im = []
    for i in range(0, len(ev_img), 100):
        im.append(features(model.get_image_features(pixel_values=pixels(ev_img[i:i + 100]))))
    im = torch.cat(im)
    im = im / im.norm(dim=-1, keepdim=True)
    col = shp = 0
    for k, e in enumerate(ev):
        s = tf @ im[k]
        col += int(torch.argmax(s[[index[c] for c in e["colour"]]]) == e["colour_idx"])
        shp += int(torch.argmax(s[[index[c] for c in e["shape"]]]) == e["shape_idx"])
    model.train()
    return col / len(ev), shp / len(ev)


def features(out):
    # transformers 5 returns output objects from get_*_features; older versions tensors.
    return out if torch.is_tensor(out) else out.pooler_output


opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.wd, eps=1e-8)
warm = max(1, args.steps // 20)


def lr_at(s):
    if s < warm:
        return args.lr * (s + 1) / warm
    p = (s - warm) / max(1, args.steps - warm)
    return args.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * p)))


print(json.dumps({"params": n_params, "train_pairs": len(caps), **vars(args)}), flush=True)
nb = len(caps) // args.batch
t0 = time.time()
acc_hist = []
for step in range(args.steps):
    b = step % nb
    sl = slice(b * args.batch, (b + 1) * args.batch)
    imgs, texts = train[sl], caps[sl]
    if args.no_hard_negatives:
        imgs, texts = imgs[0::2], texts[0::2]
    a, m = ids(list(texts))
    img = model.get_image_features(pixel_values=pixels(imgs))
    txt = model.get_text_features(input_ids=a, attention_mask=m)
    img = features(img)
    txt = features(txt)
    img = img / img.norm(dim=-1, keepdim=True)
    txt = txt / txt.norm(dim=-1, keepdim=True)
    logits = model.logit_scale.exp() * img @ txt.t()
    y = torch.arange(len(texts))
    loss = (torch.nn.functional.cross_entropy(logits, y) + torch.nn.functional.cross_entropy(logits.t(), y)) / 2
    for gparam in opt.param_groups:
        gparam["lr"] = lr_at(step)
    opt.zero_grad()
    loss.backward()
    opt.step()
    with torch.no_grad():
        model.logit_scale.clamp_(0, math.log(100))
        acc = ((logits.argmax(1) == y).float().mean() + (logits.argmax(0) == y).float().mean()) / 2
    acc_hist.append(acc.item())
    if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
        c, s = evaluate()
        print(json.dumps({"step": step + 1, "loss": round(loss.item(), 4),
                          "batch_acc": round(float(np.mean(acc_hist[-50:])), 3),
                          "T": round(model.logit_scale.exp().item(), 2),
                          "colour": c, "shape": s, "s": round(time.time() - t0, 1)}), flush=True)
