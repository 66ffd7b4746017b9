#!/usr/bin/env python3
"""Builds the `vqclip inspect` parity goldens under tests/fixtures/inspect/ with transformers.

Run from the repository root:  /work/pyenv/bin/python tools/make_inspect_fixtures.py

For each tiny checkpoint of tests/fixtures/clip/ (tiny_quickgelu: quick_gelu, small_gelu: gelu)
it runs transformers' CLIPModel with eager attention and
`output_attentions=True, output_hidden_states=True`:

  - each text of TEXTS alone (unpadded: BOS ... EOS, no attention mask, as `inspect` runs it),
  - each image of IMAGES (tests/fixtures/clip/images/, CLIPImageProcessorPil with the folder's
    preprocessor_config.json),

and writes tests/fixtures/inspect/<model>.safetensors with exactly the names `vqclip inspect`
writes to tensors.safetensors (batch dimension dropped):

  text.{k}.attentions.{l}      [heads, T, T]       l = 0 .. L-1
  text.{k}.hidden_states.{l}   [T, hidden]         l = 0 (embeddings) .. L (before final LN)
  text.{k}.embeds              [projection]        L2-normalised text_embeds
  image.{k}.attentions.{l}     [heads, P+1, P+1]
  image.{k}.hidden_states.{l}  [P+1, hidden]       l = 0 is after pre_layrnorm
  image.{k}.embeds             [projection]

plus, for the pictures' maps (what `summary.json` holds as `rollout` / `relevance`):

  rollout.{k}                  [G*G]   the class token's attention rollout (Abnar & Zuidema)
  relevance.{k}.{j}            [G*G]   image k's relevance for text j (Chefer et al. 2021):
                                       gradients of the image-text cosine with respect to
                                       each layer's attention probabilities, by autograd

The metadata holds the texts, the image file names and the token ids (JSON strings).
"""

import json
import os

import torch
from PIL import Image
from safetensors.torch import save_file

from transformers import CLIPModel, CLIPTokenizer
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
CLIP = os.path.join(ROOT, "tests", "fixtures", "clip")
OUT = os.path.join(ROOT, "tests", "fixtures", "inspect")
MODELS = ["tiny_quickgelu", "small_gelu"]
TEXTS = ["a photo of a cat", "You should've done this"]
IMAGES = ["square_64.png", "photo_320x240.png"]


def golden(name):
    folder = os.path.join(CLIP, name)
    model = CLIPModel.from_pretrained(
        folder, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    tok = CLIPTokenizer.from_pretrained(
        folder, model_max_length=model.config.text_config.max_position_embeddings
    )
    proc = CLIPImageProcessorPil.from_pretrained(folder)
    out, ids_all = {}, []
    with torch.no_grad():
        for k, text in enumerate(TEXTS):
            ids = tok(text, truncation=True)["input_ids"]
            ids_all.append(ids)
            o = model.text_model(
                input_ids=torch.tensor([ids]),
                output_attentions=True,
                output_hidden_states=True,
            )
            L = model.config.text_config.num_hidden_layers
            assert len(o.hidden_states) == L + 1 and len(o.attentions) == L
            for l, h in enumerate(o.hidden_states):
                out[f"text.{k}.hidden_states.{l}"] = h[0]
            for l, a in enumerate(o.attentions):
                out[f"text.{k}.attentions.{l}"] = a[0]
            e = model.get_text_features(input_ids=torch.tensor([ids]))
            e = getattr(e, "pooler_output", e)
            out[f"text.{k}.embeds"] = (e / e.norm(dim=-1, keepdim=True))[0]
        for k, image in enumerate(IMAGES):
            im = Image.open(os.path.join(CLIP, "images", image))
            pv = proc(images=[im], return_tensors="pt")["pixel_values"].float()
            o = model.vision_model(
                pixel_values=pv, output_attentions=True, output_hidden_states=True
            )
            L = model.config.vision_config.num_hidden_layers
            assert len(o.hidden_states) == L + 1 and len(o.attentions) == L
            # hidden_states[0] is the encoder input: the embeddings after pre_layrnorm.
            pre = model.vision_model.pre_layrnorm(model.vision_model.embeddings(pv))
            assert torch.allclose(o.hidden_states[0], pre)
            for l, h in enumerate(o.hidden_states):
                out[f"image.{k}.hidden_states.{l}"] = h[0]
            for l, a in enumerate(o.attentions):
                out[f"image.{k}.attentions.{l}"] = a[0]
            e = model.get_image_features(pixel_values=pv)
            e = getattr(e, "pooler_output", e)
            out[f"image.{k}.embeds"] = (e / e.norm(dim=-1, keepdim=True))[0]
        for k in range(len(IMAGES)):
            out[f"rollout.{k}"] = rollout(
                [out[f"image.{k}.attentions.{l}"] for l in range(L)]
            )
    for k, image in enumerate(IMAGES):
        im = Image.open(os.path.join(CLIP, "images", image))
        pv = proc(images=[im], return_tensors="pt")["pixel_values"].float()
        for j in range(len(TEXTS)):
            out[f"relevance.{k}.{j}"] = relevance(model, pv, out[f"text.{j}.embeds"])
    out = {k: v.detach().contiguous().float() for k, v in out.items()}
    meta = {
        "generator": "tools/make_inspect_fixtures.py",
        "texts": json.dumps(TEXTS),
        "images": json.dumps(IMAGES),
        "input_ids": json.dumps(ids_all),
        "transformers": __import__("transformers").__version__,
    }
    os.makedirs(OUT, exist_ok=True)
    path = os.path.join(OUT, f"{name}.safetensors")
    save_file(out, path, metadata=meta)
    print(f"{path}: {len(out)} tensors, {os.path.getsize(path)} bytes")


def rollout(attns):
    """Class-token row of prod_l (mean_h A_l + I) / 2 (rows renormalised), without column 0."""
    t = attns[0].shape[-1]
    r = torch.eye(t)
    for a in attns:
        a = a.mean(0) + torch.eye(t)
        a = a / a.sum(-1, keepdim=True)
        r = a @ r
    return r[0, 1:]


def relevance(model, pv, text_embeds):
    """Chefer et al. 2021: R = I; per layer R += mean_h (dcos/dA * A)^+ @ R; class row."""
    with torch.enable_grad():
        o = model.vision_model(pixel_values=pv, output_attentions=True)
        for a in o.attentions:
            a.retain_grad()
        e = model.visual_projection(o.pooler_output)
        cos = ((e / e.norm(dim=-1, keepdim=True))[0] * text_embeds).sum()
        cos.backward()
    t = o.attentions[0].shape[-1]
    r = torch.eye(t)
    for a in o.attentions:
        cam = (a.grad[0] * a[0]).clamp(min=0).mean(0)
        r = r + cam @ r
    return r[0, 1:].detach()


if __name__ == "__main__":
    torch.manual_seed(0)
    for m in MODELS:
        golden(m)
