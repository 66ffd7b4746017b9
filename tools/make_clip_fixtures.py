#!/usr/bin/env python3
"""Builds the CLIP test fixtures under tests/fixtures/clip/ with Hugging Face transformers.

Run from the repository root:  /work/pyenv/bin/python tools/make_clip_fixtures.py

What it writes (everything is deterministic: fixed seeds, images drawn from formulas):

  tests/fixtures/clip/images/*.png           small test images (non-square, grey, RGBA, model-sized)
  tests/fixtures/clip/<model>/               a Hugging Face CLIP folder per model:
      config.json, model.safetensors, preprocessor_config.json, tokenizer files
      golden.json         texts, their token ids (unpadded, truncated as transformers does),
                          the images used, logit_scale, notes
      golden.safetensors  pixel_values (PIL and torchvision backends of CLIPImageProcessor),
                          text/image features before and after L2 normalisation, logits_per_image
  tests/fixtures/clip/preprocess_224/         CLIPImageProcessor() defaults (224) on a non-square
                                              image, both backends, as golden pixel_values

Models are random-initialised real CLIP architectures (transformers.CLIPModel), with every
weight moved away from its default init (LayerNorm gains/biases, linear biases, embeddings) so
that a missing bias or swapped norm shows up in the comparison. Weights are rounded to the
stored dtype (f16 / bf16 / f32) before the goldens are computed, and goldens come from the folder
reloaded with from_pretrained, so they describe exactly what the files hold.

The tokenizer is built from OpenAI's merge list (MIT, /work/shared/data/bpe_simple_vocab_16e6.txt.gz):
vocab.json + merges.txt are derived from it, loaded with transformers' CLIPTokenizer, and saved
again (which writes tokenizer.json).
"""

import gzip
import json
import math
import os
import shutil
import sys

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

from transformers import CLIPConfig, CLIPModel, CLIPTokenizer
from transformers.models.clip.image_processing_clip import CLIPImageProcessor
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
OUT = os.path.join(ROOT, "tests", "fixtures", "clip")
BPE = os.environ.get("CLIP_BPE", "/work/shared/data/bpe_simple_vocab_16e6.txt.gz")

TEXTS = [
    "a photo of a cat",
    "A cute, smiling, Nerdy Rodent",
    "You should've done this",
    "1024x768!!",
    "  Hello\tWORLD\n\n  again  ",
    "caf\u00e9 na\u00efve \u6771\u4eac \U0001F642 \u00c5ngstr\u00f6m",
    "cafe\u0301 (decomposed accent, NFC joins it)",
    "",
    "<|startoftext|>special tokens in the text<|endoftext|>",
    "it's 3:45pm -- don't panic... ok?! #hashtag @user http://example.com/a_b?c=d",
    " ".join(f"word{i} and more punctuation, digits {i * 7919 % 1000}!" for i in range(40)),
]


def bytes_to_unicode():
    """GPT-2's reversible byte -> printable unicode map (the order the CLIP vocab uses)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("\u00a1"), ord("\u00ac") + 1))
    bs += list(range(ord("\u00ae"), ord("\u00ff") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def clip_vocab(n_merges):
    """vocab (token -> id) and merges list from OpenAI's merge file, first n_merges merges."""
    with gzip.open(BPE, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    merges = [tuple(l.split()) for l in lines[1 : 1 + n_merges]]
    chars = list(bytes_to_unicode().values())
    vocab = chars + [c + "</w>" for c in chars]
    known = set(vocab)
    kept = []
    for a, b in merges:
        # The first K merges of a BPE list only combine symbols made by earlier merges.
        assert a in known and b in known, (a, b)
        vocab.append(a + b)
        known.add(a + b)
        kept.append((a, b))
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(vocab)}, kept


def write_tokenizer(folder, n_merges, context, keep):
    """Writes vocab.json + merges.txt, loads them with CLIPTokenizer, saves the HF files.

    keep: which of the tokenizer files stay in the folder ("json" = tokenizer.json only,
    "vocab" = vocab.json + merges.txt only, "both")."""
    vocab, merges = clip_vocab(n_merges)
    tmp = os.path.join(folder, "_tok")
    os.makedirs(tmp, exist_ok=True)
    with open(os.path.join(tmp, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(os.path.join(tmp, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n")
        for a, b in merges:
            f.write(f"{a} {b}\n")
    tok = CLIPTokenizer.from_pretrained(tmp, model_max_length=context)
    tok.save_pretrained(folder)
    # save_pretrained writes tokenizer.json + tokenizer_config.json; the vocab files are ours.
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(os.path.join(tmp, name), os.path.join(folder, name))
    shutil.rmtree(tmp)
    if keep == "json":
        os.remove(os.path.join(folder, "vocab.json"))
        os.remove(os.path.join(folder, "merges.txt"))
    elif keep == "vocab":
        os.remove(os.path.join(folder, "tokenizer.json"))
    for extra in ("special_tokens_map.json", "chat_template.jinja"):
        p = os.path.join(folder, extra)
        if os.path.exists(p):
            os.remove(p)
    # Reload from exactly the files that stay, so the goldens describe them.
    return CLIPTokenizer.from_pretrained(folder, model_max_length=context)


def make_images():
    """Deterministic test images: gradients, discs and stripes (no randomness in the pixels)."""
    d = os.path.join(OUT, "images")
    os.makedirs(d, exist_ok=True)

    def rgb(w, h, phase):
        y, x = np.mgrid[0:h, 0:w].astype(np.float64)
        r = 127.5 + 127.5 * np.sin(x / (3.0 + phase) + y / 11.0)
        g = 255.0 * ((x + 2 * y + 17 * phase) % 64) / 63.0
        disc = ((x - w * 0.6) ** 2 + (y - h * 0.4) ** 2) < (min(w, h) * 0.3) ** 2
        b = np.where(disc, 230.0, 40.0 + 180.0 * y / max(h - 1, 1))
        return np.clip(np.stack([r, g, b], -1), 0, 255).round().astype(np.uint8)

    imgs = {
        "wide_96x64.png": Image.fromarray(rgb(96, 64, 0)),
        "tall_30x45.png": Image.fromarray(rgb(30, 45, 1)),
        "square_32.png": Image.fromarray(rgb(32, 32, 2)),
        "square_64.png": Image.fromarray(rgb(64, 64, 3)),
        "grey_50x40.png": Image.fromarray(rgb(50, 40, 4)[..., 1], mode="L"),
    }
    rgba = np.concatenate([rgb(40, 40, 5), np.full((40, 40, 1), 128, np.uint8)], -1)
    imgs["rgba_40.png"] = Image.fromarray(rgba, mode="RGBA")
    imgs["photo_320x240.png"] = Image.fromarray(rgb(320, 240, 6))
    for name, im in imgs.items():
        im.save(os.path.join(d, name))
    return d


def processors(size):
    kw = dict(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    return CLIPImageProcessorPil(**kw), CLIPImageProcessor(**kw)


def pixel_values(proc, paths):
    ims = [Image.open(p) for p in paths]
    return proc(images=ims, return_tensors="pt")["pixel_values"].float()


def perturb(model, seed):
    """Moves every parameter away from its default init, in a way that keeps activations O(1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name == "logit_scale":
                p.fill_(math.log(30.0))
            elif "layer_norm" in name or "layrnorm" in name or "layernorm" in name:
                if name.endswith("weight"):
                    p.copy_(1.0 + 0.25 * torch.randn(p.shape, generator=g))
                else:
                    p.copy_(0.2 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
            elif "patch_embedding" in name:
                fan_in = p.shape[1] * p.shape[2] * p.shape[3]
                p.copy_(torch.randn(p.shape, generator=g) * 2.0 / math.sqrt(fan_in))
            elif p.dim() == 2 and "embedding" not in name:
                # Linear weight [out, in]: q/k scaled up so that attention is far from uniform.
                s = 1.8 if ("q_proj" in name or "k_proj" in name) else 1.0
                p.copy_(torch.randn(p.shape, generator=g) * s / math.sqrt(p.shape[1]))
            else:
                # token / position / class embeddings
                p.copy_(0.7 * torch.randn(p.shape, generator=g))


def round_to(model, dtype):
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(dtype).float())


def build_model(name, cfg, *, dtype, n_merges, tok_files, seed, image_paths, config_edit=None,
                extra_int64=False):
    folder = os.path.join(OUT, name)
    if os.path.exists(folder):
        shutil.rmtree(folder)
    os.makedirs(folder)
    torch.manual_seed(seed)
    context = cfg["text_config"]["max_position_embeddings"]
    tok = write_tokenizer(folder, n_merges, context, tok_files)

    config = CLIPConfig(**cfg)
    model = CLIPModel(config).eval()
    perturb(model, seed + 1)
    round_to(model, dtype)
    model.to(dtype).save_pretrained(folder, safe_serialization=True)

    cfg_path = os.path.join(folder, "config.json")
    with open(cfg_path) as f:
        saved = json.load(f)
    if config_edit:
        saved = config_edit(saved)
    with open(cfg_path, "w") as f:
        json.dump(saved, f, indent=2, sort_keys=True)

    if extra_int64:
        # Hub checkpoints carry the int64 position_ids buffers; readers must tolerate them.
        from safetensors.torch import load_file

        sd = load_file(os.path.join(folder, "model.safetensors"))
        n_text = cfg["text_config"]["max_position_embeddings"]
        v = cfg["vision_config"]
        n_vis = (v["image_size"] // v["patch_size"]) ** 2 + 1
        sd["text_model.embeddings.position_ids"] = torch.arange(n_text).unsqueeze(0)
        sd["vision_model.embeddings.position_ids"] = torch.arange(n_vis).unsqueeze(0)
        save_file(sd, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})

    size = cfg["vision_config"]["image_size"]
    pil_proc, tv_proc = processors(size)
    pil_proc.save_pretrained(folder)

    # Goldens from the folder as transformers reads it.
    model = CLIPModel.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager").eval()
    tok = CLIPTokenizer.from_pretrained(folder, model_max_length=context)
    ids = tok(TEXTS, truncation=True, max_length=context)["input_ids"]
    batch = tok(TEXTS, truncation=True, max_length=context, padding=True, return_tensors="pt")
    pv_pil = pixel_values(pil_proc, image_paths)
    pv_tv = pixel_values(tv_proc, image_paths)
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    pixel_values=pv_pil)
        text_features = model.get_text_features(input_ids=batch["input_ids"],
                                                attention_mask=batch["attention_mask"]).pooler_output
        image_features = model.get_image_features(pixel_values=pv_pil).pooler_output
        # Each text alone (no padding) must give the same pooled features: check it here so the
        # fixture itself documents that padding to the batch maximum is harmless.
        for i, t in enumerate(TEXTS):
            one = tok([t], truncation=True, max_length=context, return_tensors="pt")
            f1 = model.get_text_features(**one).pooler_output[0]
            assert torch.allclose(f1, text_features[i], atol=1e-5), (name, t)

    tensors = {
        "pixel_values_pil": pv_pil.contiguous(),
        "pixel_values_torchvision": pv_tv.contiguous(),
        "text_features": text_features.contiguous(),
        "image_features": image_features.contiguous(),
        "text_embeds": out.text_embeds.contiguous(),
        "image_embeds": out.image_embeds.contiguous(),
        "logits_per_image": out.logits_per_image.contiguous(),
    }
    save_file(tensors, os.path.join(folder, "golden.safetensors"))
    golden = {
        "generator": "tools/make_clip_fixtures.py",
        "transformers": __import__("transformers").__version__,
        "torch": torch.__version__,
        "dtype": str(dtype).replace("torch.", ""),
        "texts": TEXTS,
        "input_ids": ids,
        "context_length": context,
        "images": [os.path.relpath(p, folder) for p in image_paths],
        "logit_scale": float(model.logit_scale.item()),
        "eos_token_id": model.config.text_config.eos_token_id,
        "note": "input_ids: transformers CLIPTokenizer(texts, truncation=True, max_length=context); "
        "embeds from the padded batch with attention_mask; pixel_values_pil feed the model goldens",
    }
    with open(os.path.join(folder, "golden.json"), "w", encoding="utf-8") as f:
        json.dump(golden, f, indent=1, ensure_ascii=False)
    print(f"{name}: {sum(os.path.getsize(os.path.join(folder, x)) for x in os.listdir(folder)) / 1e6:.2f} MB")


def hub_like(saved):
    """Makes config.json look like the hub file of openai/clip-vit-base-patch32 (legacy ids)."""
    saved["text_config"]["bos_token_id"] = 0
    saved["text_config"]["eos_token_id"] = 2
    saved["text_config"]["pad_token_id"] = 1
    saved["text_config_dict"] = None
    saved["vision_config_dict"] = None
    return saved


def sparse_config(saved):
    """Keeps only what differs from the class defaults, to test that defaults are applied."""
    keep_t = ["hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "vocab_size", "max_position_embeddings", "eos_token_id", "layer_norm_eps"]
    keep_v = ["hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "image_size", "patch_size"]
    return {
        "architectures": ["CLIPModel"],
        "model_type": "clip",
        "projection_dim": saved["projection_dim"],
        "text_config": {k: saved["text_config"][k] for k in keep_t},
        "vision_config": {k: saved["vision_config"][k] for k in keep_v},
    }


def main():
    if not os.path.exists(BPE):
        sys.exit(f"missing {BPE} (set CLIP_BPE)")
    img_dir = make_images()
    img = lambda n: os.path.join(img_dir, n)
    full = 49152 - 256 - 2

    # A: real vocabulary (49408), hub-like config (legacy eos_token_id 2 -> argmax pooling),
    # quick_gelu, f16 storage, patch 8 on 32x32.
    build_model(
        "tiny_quickgelu",
        dict(
            projection_dim=16,
            text_config=dict(vocab_size=49408, hidden_size=32, intermediate_size=64,
                             num_hidden_layers=2, num_attention_heads=2,
                             max_position_embeddings=77, hidden_act="quick_gelu"),
            vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                               num_attention_heads=4, image_size=32, patch_size=8,
                               hidden_act="quick_gelu"),
        ),
        dtype=torch.float16, n_merges=full, tok_files="both", seed=1,
        image_paths=[img("wide_96x64.png"), img("tall_30x45.png"), img("square_32.png"),
                     img("grey_50x40.png"), img("rgba_40.png")],
        config_edit=hub_like,
    )
    # B: reduced vocabulary (first 2000 merges) from vocab.json + merges.txt only; eos_token_id is
    # the real EOS (first-EOS pooling); gelu; f32 with int64 position_ids like hub files;
    # context 32 (truncation); patch 16 on 64x64.
    nb = 2000
    build_model(
        "small_gelu",
        dict(
            projection_dim=24,
            text_config=dict(vocab_size=512 + nb + 2, hidden_size=48, intermediate_size=96,
                             num_hidden_layers=2, num_attention_heads=3,
                             max_position_embeddings=32, hidden_act="gelu",
                             bos_token_id=512 + nb, eos_token_id=512 + nb + 1, pad_token_id=1,
                             layer_norm_eps=1e-6),
            vision_config=dict(hidden_size=48, intermediate_size=192, num_hidden_layers=2,
                               num_attention_heads=4, image_size=64, patch_size=16,
                               hidden_act="gelu", layer_norm_eps=1e-6),
        ),
        dtype=torch.float32, n_merges=nb, tok_files="vocab", seed=2,
        image_paths=[img("wide_96x64.png"), img("tall_30x45.png"), img("square_64.png")],
        extra_int64=True,
    )
    # C: sparse config.json (defaults: quick_gelu, eps 1e-5, 3 channels), bf16 storage,
    # tokenizer.json only (reduced vocab), odd sizes: 40 wide, 5 heads of 8, 48px / patch 16.
    nc = 1000
    build_model(
        "sparse_bf16",
        dict(
            projection_dim=20,
            text_config=dict(vocab_size=512 + nc + 2, hidden_size=40, intermediate_size=72,
                             num_hidden_layers=3, num_attention_heads=5,
                             max_position_embeddings=20, eos_token_id=512 + nc + 1,
                             layer_norm_eps=1e-5),
            vision_config=dict(hidden_size=40, intermediate_size=80, num_hidden_layers=2,
                               num_attention_heads=2, image_size=48, patch_size=16),
        ),
        dtype=torch.bfloat16, n_merges=nc, tok_files="json", seed=3,
        image_paths=[img("photo_320x240.png"), img("wide_96x64.png")],
        config_edit=sparse_config,
    )

    # CLIPImageProcessor defaults (shortest edge 224, crop 224) on a non-square image.
    d = os.path.join(OUT, "preprocess_224")
    os.makedirs(d, exist_ok=True)
    paths = [img("photo_320x240.png")]
    pil_proc, tv_proc = CLIPImageProcessorPil(), CLIPImageProcessor()
    pil_proc.save_pretrained(d)
    save_file(
        {
            "pixel_values_pil": pixel_values(pil_proc, paths).contiguous(),
            "pixel_values_torchvision": pixel_values(tv_proc, paths).contiguous(),
        },
        os.path.join(d, "golden.safetensors"),
    )
    with open(os.path.join(d, "golden.json"), "w") as f:
        json.dump({"images": [os.path.relpath(p, d) for p in paths],
                   "note": "CLIPImageProcessorPil() and CLIPImageProcessor() (torchvision) defaults"},
                  f, indent=1)
    total = 0
    for dp, _, fs in os.walk(OUT):
        total += sum(os.path.getsize(os.path.join(dp, x)) for x in fs)
    print(f"total fixtures: {total / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
