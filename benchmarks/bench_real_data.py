"""The real-data figures of benchmarks/README.md ("Real data"), each part timed.

    python benchmarks/bench_real_data.py --shared_data_dir=DATA --workdir=WORK \\
        [--parts=prepare,clip,cca,fusion,coco]

DATA holds `fsdd/recordings/` (FSDD), `mnist/` (MNIST's t10k IDX files) and
`coco_mini/` (COCO 2017's annotations/ and image folders); `--fsdd_dir`, `--mnist_dir`
and `--coco_dir` name them one by one instead. Everything is written under WORK
(prepared datasets, run workdirs, `results.json`); nothing is downloaded. Parts:

  prepare  av_digits from the FSDD recordings and MNIST's 10,000 t10k digits, prepared
           afresh: wall time and examples per split and digit
  clip     configs/av_digits_clip.py trained and evaluated: class-level audio->image
           and image->audio R@1 on the 300 test recordings
  cca      the linear baseline: CCA between log-mel statistics of the audio (mean and
           std over time of each mel band, mmjax's filterbank, and the band means over
           S equal stretches of the clip) and the pixels, fitted on the train split
           (S, ridge and dimension chosen on validation); class-level R@1 of cosine
           retrieval in the CCA space on the test split
  fusion   configs/av_digits_fusion_{concat,flexmoe,gated}.py and the unimodal
           classifiers (concat's :image_only, :audio_only): test accuracy with both,
           each alone and at test-time missing rates 0 / 0.3 / 0.5 / 0.7
  coco     coco_captions (config captions) prepared from the COCO subset: image and
           caption counts against the JSON, every image decoded at its JSON size; and
           configs/coco_clip.py's retrieval (a path check on a few dozen images)

Run it alone on the machine: the load average is printed before each part.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np

from bench_common import load, note_load

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PARTS = ("prepare", "clip", "cca", "fusion", "coco")
FUSION_RUNS = (("concat", "av_digits_fusion_concat", None),
               ("flexmoe", "av_digits_fusion_flexmoe", None),
               ("gated", "av_digits_fusion_gated", None),
               ("image only", "av_digits_fusion_concat", "image_only"),
               ("audio only", "av_digits_fusion_concat", "audio_only"))
CONDITIONS = ("audio+image", "image", "audio", "missing_0", "missing_0.3", "missing_0.5",
              "missing_0.7")


def train(config, workdir):
  from mmjax.train import trainer  # pylint: disable=g-import-not-at-top
  start = time.time()
  metrics = trainer.train_and_evaluate(config, workdir)
  return metrics, time.time() - start


def av_manual_dir(args) -> str:
  """A manual_dir for av_digits: links to the FSDD and MNIST folders."""
  raw = os.path.join(args.workdir, "raw_av_digits")
  os.makedirs(raw, exist_ok=True)
  for name, target in (("fsdd", os.path.dirname(os.path.join(args.fsdd_dir, ""))),
                       ("mnist", args.mnist_dir)):
    link = os.path.join(raw, name)
    if os.path.islink(link):
      os.unlink(link)
    os.symlink(os.path.abspath(target), link)
  return raw


def part_prepare(args, tfds_dir):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from mmjax.data import prepare as prepare_lib  # pylint: disable=g-import-not-at-top
  tfds.disable_progress_bar()
  start = time.time()
  p = prepare_lib.prepare("av_digits", av_manual_dir(args), tfds_dir, overwrite=True)
  seconds = time.time() - start
  table = {}
  for split in p.counts:
    source = tfds.data_source(p.name, split=split, data_dir=tfds_dir, download=False,
                              decoders={"image": tfds.decode.SkipDecoding()})
    labels = [int(source[i]["label"]) for i in range(len(source))]
    table[split] = np.bincount(labels, minlength=10).tolist()
  print(f"prepared {p.name} in {seconds:.1f} s: {p.counts}")
  print("| split | " + " | ".join(str(d) for d in range(10)) + " | total |")
  for split, row in table.items():
    print(f"| {split} | " + " | ".join(map(str, row)) + f" | {sum(row)} |")
  return {"seconds": seconds, "counts": p.counts, "per_digit": table, "name": p.name}


def part_clip(args, tfds_dir):
  config = load("av_digits_clip", **{"data.data_dir": tfds_dir})
  metrics, seconds = train(config, os.path.join(args.workdir, "av_digits_clip"))
  keys = [k for k in metrics if k.startswith("eval/") and (
      k.endswith("/R@1") or k.endswith("/R@5") or k.endswith("/mAP")
      or k.endswith("/accuracy"))]
  out = {k: metrics[k] for k in sorted(keys)}
  out["seconds"] = seconds
  print(f"av_digits_clip: {seconds:.0f} s")
  for k in sorted(keys):
    print(f"  {k}: {metrics[k]:.4f}")
  return out


# --- the linear baseline --------------------------------------------------------------


def log_mel(wave, length, filters, n_fft=256, hop=128, floor=1e-6):
  """[frames, mels] log-mel spectrogram of wave[:length] (periodic Hann window,
  |rFFT|^2, mmjax's HTK filterbank)."""
  wave = wave[:max(int(length), n_fft)]
  frames = 1 + (len(wave) - n_fft) // hop
  index = np.arange(frames)[:, None] * hop + np.arange(n_fft)[None, :]
  window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n_fft) / n_fft)
  power = np.abs(np.fft.rfft(wave[index] * window, axis=-1)) ** 2
  return np.log(np.maximum(power @ filters, floor))


def logmel_stats(logmel, stretches=0):
  """Mean and std over time of each band, then each band's mean over `stretches`
  equal stretches of the clip (a coarse time course; 0: none)."""
  stats = [logmel.mean(0), logmel.std(0)]
  if stretches:
    stats += [part.mean(0) for part in np.array_split(logmel, stretches, axis=0)]
  return np.concatenate(stats)


def av_features(tfds_dir, split):
  """(audio log-mel spectrograms, pixels, labels) of a split, in the evaluation form."""
  from mmjax.data import pipeline  # pylint: disable=g-import-not-at-top
  from mmjax.models import audio as audio_lib  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  sys.path.insert(0, os.path.join(REPO, "configs"))
  import av_digits_common as common  # pylint: disable=g-import-not-at-top
  data = common.data(("image", "audio"), data_dir=tfds_dir, audio_samples=20000)
  source = pipeline.make_source(data, split)
  filters = audio_lib.mel_filterbank(common.SAMPLE_RATE, 256, 32).astype(np.float64)
  audio, pixels, labels = [], [], []
  for i in range(len(source)):
    r = source[i]
    audio.append(log_mel(r["audio"].astype(np.float64), r["length"]["audio"], filters))
    pixels.append(r["image"].reshape(-1))
    labels.append(r["label"])
  return audio, np.array(pixels, np.float64), np.array(labels)


def inv_sqrt(cov, ridge):
  """(cov + ridge * mean eigenvalue * I)^(-1/2), symmetric."""
  values, vectors = np.linalg.eigh(cov)
  values = values + ridge * max(values.mean(), 1e-12)
  return (vectors / np.sqrt(values)) @ vectors.T


def fit_cca(x, y, ridge):
  """(mean_x, W_x, mean_y, W_y, correlations): projections onto the canonical
  directions, strongest first (keep the first columns): whiten each view with its
  ridge-regularised covariance, then the SVD of the whitened cross-covariance."""
  mx, my = x.mean(0), y.mean(0)
  xc, yc = x - mx, y - my
  n = len(x)
  wx = inv_sqrt(xc.T @ xc / n, ridge)
  wy = inv_sqrt(yc.T @ yc / n, ridge)
  u, corr, vt = np.linalg.svd(wx @ (xc.T @ yc / n) @ wy, full_matrices=False)
  return mx, wx @ u, my, wy @ vt.T, corr


def class_r1(queries, targets, query_labels, target_labels):
  """Class-level R@1 of cosine retrieval (a hit: the best target has the query's label)."""
  q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
  t = targets / np.linalg.norm(targets, axis=1, keepdims=True)
  return float(np.mean(target_labels[np.argmax(q @ t.T, axis=1)] == query_labels))


def part_cca(args, tfds_dir):
  start = time.time()
  spectra = {s: av_features(tfds_dir, s) for s in ("train", "validation", "test")}

  def statistics(stretches):
    feats = {s: (np.array([logmel_stats(m, stretches) for m in mels]), p, y)
             for s, (mels, p, y) in spectra.items()}
    # Standardised with the train split's moments.
    mu, sd = feats["train"][0].mean(0), feats["train"][0].std(0) + 1e-8
    return {s: ((a - mu) / sd, p, y) for s, (a, p, y) in feats.items()}

  def score(feats, split, fit, dims):
    a, p, y = feats[split]
    mx, wx, my, wy, _ = fit
    za, zp = (a - mx) @ wx[:, :dims], (p - my) @ wy[:, :dims]
    return class_r1(za, zp, y, y), class_r1(zp, za, y, y)

  best = None
  for stretches in (0, 2, 3, 4, 6):
    feats = statistics(stretches)
    a, p, _ = feats["train"]
    for ridge in (1e-3, 1e-2, 1e-1, 1.0):
      fit = fit_cca(a, p, ridge)
      for dims in (5, 9, 16, 32, 64):
        val = float(np.mean(score(feats, "validation", fit, dims)))
        if best is None or val > best[0]:
          best = (val, stretches, ridge, dims, fit, feats)
  val, stretches, ridge, dims, fit, feats = best
  a2i, i2a = score(feats, "test", fit, dims)
  seconds = time.time() - start
  print(f"CCA ({stretches} stretches, ridge {ridge}, {dims} dims, validation mean R@1 "
        f"{val:.3f}): test audio->image R@1 {a2i:.3f}, image->audio R@1 {i2a:.3f} "
        f"({seconds:.0f} s)")
  return {"audio->image/R@1": a2i, "image->audio/R@1": i2a, "stretches": stretches,
          "ridge": ridge, "dims": dims, "validation_R@1": val, "seconds": seconds}


def part_fusion(args, tfds_dir):
  rows = {}
  for label, name, arg in FUSION_RUNS:
    note_load(f"fusion {label}")
    config = load(name, arg, **{"data.data_dir": tfds_dir})
    metrics, seconds = train(config, os.path.join(args.workdir, f"{name}_{arg or 'fusion'}"))
    row = {c: metrics.get(f"eval/robustness/{c}/accuracy") for c in CONDITIONS}
    row["seconds"] = seconds
    rows[label] = row
    print(f"{label}: " + ", ".join(f"{c} {v:.4f}" for c, v in row.items()
                                   if v is not None and c != "seconds")
          + f" ({seconds:.0f} s)", flush=True)
  print("| method | both | image alone | audio alone | missing 0 | 0.3 | 0.5 | 0.7 | wall |")
  for label, row in rows.items():
    cells = ["-" if row[c] is None else f"{100 * row[c]:.1f}%" for c in CONDITIONS]
    print(f"| {label} | " + " | ".join(cells) + f" | {row['seconds']:.0f} s |")
  return rows


def part_coco(args):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from mmjax.data import prepare as prepare_lib  # pylint: disable=g-import-not-at-top
  tfds.disable_progress_bar()
  tfds_dir = os.path.join(args.workdir, "tfds")
  start = time.time()
  p = prepare_lib.prepare("coco_captions", args.coco_dir, tfds_dir, config="captions",
                          overwrite=True)
  prep_seconds = time.time() - start
  checks = {}
  for split, coco_split in (("train", "train"), ("validation", "val")):
    path = os.path.join(args.coco_dir, "annotations", f"captions_{coco_split}2017.json")
    with open(path) as f:
      js = json.load(f)
    sizes = {im["id"]: (im["height"], im["width"]) for im in js["images"]}
    source = tfds.data_source(p.name, split=split, data_dir=tfds_dir, download=False)
    wrong, captions = [], 0
    for i in range(len(source)):
      r = source[i]
      captions += len(r["captions"])
      if r["image"].shape[:2] != sizes[int(r["image_id"])]:
        wrong.append(int(r["image_id"]))
    checks[split] = {"images": len(source), "json_images": len(sizes),
                     "captions": captions, "json_captions": len(js["annotations"]),
                     "wrong_size": wrong}
    ok = (len(source) == len(sizes) and captions == len(js["annotations"]) and not wrong)
    print(f"coco {split}: {len(source)} images ({len(sizes)} in the JSON), {captions} "
          f"captions ({len(js['annotations'])}), {len(wrong)} of another size than the "
          f"JSON's: {'ok' if ok else 'MISMATCH'}")
    assert ok, checks[split]
  print(f"prepared {p.name} in {prep_seconds:.1f} s")
  note_load("coco_clip")
  metrics, seconds = train(load("coco_clip", **{"data.data_dir": tfds_dir}),
                           os.path.join(args.workdir, "coco_clip"))
  out = {k: v for k, v in metrics.items() if k.startswith("eval/retrieval/")
         and k.split("/")[-1] in ("R@1", "R@5", "R@10", "median_rank")}
  print(f"coco_clip: {seconds:.0f} s; " + ", ".join(f"{k[15:]} {v:.3f}"
                                                    for k, v in sorted(out.items())))
  return {"prepare_seconds": prep_seconds, "checks": checks, "retrieval": out,
          "seconds": seconds}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--shared_data_dir", help="holds fsdd/recordings/, mnist/, coco_mini/")
  parser.add_argument("--fsdd_dir", help="the FSDD folder holding recordings/")
  parser.add_argument("--mnist_dir", help="MNIST's t10k IDX files")
  parser.add_argument("--coco_dir", help="COCO's annotations/, train2017/, val2017/")
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--parts", default=",".join(PARTS))
  args = parser.parse_args()
  if args.shared_data_dir:
    args.fsdd_dir = args.fsdd_dir or os.path.join(args.shared_data_dir, "fsdd")
    args.mnist_dir = args.mnist_dir or os.path.join(args.shared_data_dir, "mnist")
    args.coco_dir = args.coco_dir or os.path.join(args.shared_data_dir, "coco_mini")
  parts = [p.strip() for p in args.parts.split(",") if p.strip()]
  unknown = sorted(set(parts) - set(PARTS))
  if unknown:
    parser.error(f"unknown parts {unknown}; valid: {list(PARTS)}")
  os.makedirs(args.workdir, exist_ok=True)
  tfds_dir = os.path.join(args.workdir, "tfds")
  results_path = os.path.join(args.workdir, "results.json")
  results = {}
  if os.path.exists(results_path):
    with open(results_path) as f:
      results = json.load(f)
  for part in parts:
    load1 = note_load(part)
    if part == "prepare":
      out = part_prepare(args, tfds_dir)
    elif part == "coco":
      out = part_coco(args)
    else:
      out = {"clip": part_clip, "cca": part_cca, "fusion": part_fusion}[part](args, tfds_dir)
    results[part] = {"load_average_1min": load1, **out}
    with open(results_path, "w") as f:
      json.dump(results, f, indent=1)
  print(f"\nresults: {results_path}")


if __name__ == "__main__":
  main()
