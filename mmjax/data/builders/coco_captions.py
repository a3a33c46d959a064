"""COCO Captions from COCO's own files: `annotations/captions_{split}2017.json` and the
images in `{split}2017/`, plus the object categories of `instances_{split}2017.json` in
the 'objects' config.

Every image a captions JSON lists becomes one example with all its captions (in the
JSON's order, stripped of surrounding whitespace). Images in the folder that the JSON
does not list are ignored; a listed image missing on disk, a caption whose image_id
the JSON's images do not list, and a decoded size other than the JSON's width and
height are errors naming them. An image that does not decode follows `on_bad_file`.

Splits: COCO's train2017 -> 'train', val2017 -> 'validation'; either may be absent
from the manual_dir, not both.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os

import numpy as np
import tensorflow_datasets as tfds

from mmjax.data.builders import common

TFDS_NAME = "mmjax_coco_captions"
SPLITS = {"train": "train", "validation": "val"}     # split -> COCO's name
CONFIGS = ("captions", "objects")
# COCO's 80 object categories in the order of their ids (1..90 with gaps); the
# 'objects' config checks every instances JSON's categories against it.
CATEGORIES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat",
    "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack",
    "umbrella", "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard",
    "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl",
    "banana", "apple", "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza",
    "donut", "cake", "chair", "couch", "potted plant", "bed", "dining table", "toilet",
    "tv", "laptop", "mouse", "remote", "keyboard", "cell phone", "microwave", "oven",
    "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors", "teddy bear",
    "hair drier", "toothbrush")


@dataclasses.dataclass(eq=False)
class CocoConfig(common.LocalConfig):
  """`objects`: read `instances_{split}2017.json` into the `objects` feature."""
  objects: bool = False


def captions_path(manual_dir: str, coco_split: str) -> str:
  return os.path.join(manual_dir, "annotations", f"captions_{coco_split}2017.json")


def instances_path(manual_dir: str, coco_split: str) -> str:
  return os.path.join(manual_dir, "annotations", f"instances_{coco_split}2017.json")


def present_splits(manual_dir: str) -> dict[str, str]:
  """split -> COCO split of the captions JSONs in manual_dir (at least one)."""
  found = {s: c for s, c in SPLITS.items() if os.path.isfile(captions_path(manual_dir, c))}
  if not found:
    raise common.missing(manual_dir, "COCO's caption annotations: expected "
                         f"{' or '.join(repr(f'annotations/captions_{c}2017.json') for c in SPLITS.values())}"
                         " in it")
  return found


def make_config(manual_dir: str | None = None, *, config: str | None = None,
                on_bad_file: str = "fail") -> CocoConfig:
  """'captions' or 'objects'; None picks 'objects' when every split present has its
  instances JSON, 'captions' when none has, and is an error when only some have."""
  if config is None:
    if manual_dir is None:
      raise ValueError("coco_captions: give config='captions' or 'objects', or the "
                       "manual_dir to choose by what it holds")
    has = {c: os.path.isfile(instances_path(manual_dir, c))
           for c in present_splits(manual_dir).values()}
    if all(has.values()):
      config = "objects"
    elif not any(has.values()):
      config = "captions"
    else:
      raise FileNotFoundError(
          f"manual_dir {manual_dir!r}: annotations/instances_*2017.json are there for "
          f"{[c for c, h in has.items() if h]} but not for "
          f"{[c for c, h in has.items() if not h]}; add the missing ones for the "
          "'objects' config, or prepare with --config=captions")
  if config not in CONFIGS:
    raise ValueError(f"coco_captions: config={config!r}, expected one of {CONFIGS}")
  return CocoConfig(name=config, objects=config == "objects", on_bad_file=on_bad_file,
                    description="images, captions" + (", object categories"
                                                      if config == "objects" else ""))


def usage(config: CocoConfig) -> dict:
  """How `mmjax.data.prepare` says to read the dataset."""
  notes = ["images vary in size: image_size resizes them",
           "text: captions, a Sequence(Text) of several per image; training reads one at "
           "random, the retrieval evaluator all of them (all_captions=True)"]
  if config.objects:
    notes.append("objects: Sequence(ClassLabel) of COCO's 80 categories")
  return {"features": {"image": "image", "text": "captions"}, "fields": {"image_size": 224},
          "notes": notes}


def _load_json(path: str) -> dict:
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise ValueError(f"{path}: cannot be read as JSON ({e})") from None


def read_annotations(manual_dir: str, coco_split: str, objects: bool) -> list[dict]:
  """The examples of one split: image file, id, size, captions (and category indices)."""
  path = captions_path(manual_dir, coco_split)
  data = _load_json(path)
  for key in ("images", "annotations"):
    if key not in data:
      raise ValueError(f"{path}: no {key!r} list (it has {sorted(data)})")
  images = {int(image["id"]): image for image in data["images"]}
  captions = collections.defaultdict(list)
  for ann in data["annotations"]:
    if int(ann["image_id"]) not in images:
      raise ValueError(f"{path}: caption id {ann.get('id')} has image_id "
                       f"{ann['image_id']}, which the JSON's images do not list")
    captions[int(ann["image_id"])].append(str(ann["caption"]).strip())
  categories = _read_instances(manual_dir, coco_split, images) if objects else {}
  folder = os.path.join(manual_dir, f"{coco_split}2017")
  if not os.path.isdir(folder):
    raise common.missing(manual_dir, f"the images of {os.path.basename(path)}: expected "
                         f"the folder '{coco_split}2017/' in it")
  examples = []
  for image_id, image in images.items():
    file = os.path.join(folder, image["file_name"])
    if not os.path.isfile(file):
      raise FileNotFoundError(f"{path} lists image id {image_id} as {file}, which does "
                              "not exist")
    examples.append({"file": file, "image_id": image_id, "width": int(image["width"]),
                     "height": int(image["height"]), "captions": captions[image_id],
                     "objects": categories.get(image_id, [])})
  return examples


def _read_instances(manual_dir: str, coco_split: str, images: dict) -> dict[int, list]:
  """image id -> sorted indices into CATEGORIES of the objects the instances JSON lists."""
  path = instances_path(manual_dir, coco_split)
  if not os.path.isfile(path):
    raise common.missing(manual_dir, f"{os.path.basename(path)} for the 'objects' config: "
                         f"expected 'annotations/{os.path.basename(path)}' in it (or "
                         "prepare with --config=captions)")
  data = _load_json(path)
  index = {}
  for category in data.get("categories", []):
    if category["name"] not in CATEGORIES:
      raise ValueError(f"{path}: category {category['name']!r} (id {category['id']}) is "
                       f"not one of COCO's 80 ({CATEGORIES[:3]}...)")
    index[int(category["id"])] = CATEGORIES.index(category["name"])
  found = collections.defaultdict(set)
  for ann in data.get("annotations", []):
    image_id, category_id = int(ann["image_id"]), int(ann["category_id"])
    if category_id not in index:
      raise ValueError(f"{path}: annotation {ann.get('id')} has category_id {category_id}, "
                       "which its categories do not list")
    if image_id in images:     # instances of images the captions do not list: ignored
      found[image_id].add(index[category_id])
  return {i: sorted(c) for i, c in found.items()}


class Builder(common.LocalBuilder, skip_registration=True):
  """COCO images with their captions, and in 'objects' their object categories."""

  name = TFDS_NAME
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      "Put COCO 2017's annotations/captions_{train,val}2017.json (and, for the 'objects' "
      "config, annotations/instances_{train,val}2017.json) and the image folders "
      "train2017/ and val2017/ in manual_dir/.")

  def _info(self):
    features = {
        "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
        "image_id": tfds.features.Scalar(dtype=np.int64, doc="COCO's image id"),
        "width": tfds.features.Scalar(dtype=np.int32),
        "height": tfds.features.Scalar(dtype=np.int32),
        "captions": tfds.features.Sequence(tfds.features.Text()),
    }
    if self.builder_config.objects:
      features["objects"] = tfds.features.Sequence(
          tfds.features.ClassLabel(names=CATEGORIES),
          doc="the categories of the image's object instances, each once, sorted")
    return self.dataset_info_from_configs(
        description=("COCO 2017 images with all their captions (train2017 -> train, "
                     "val2017 -> validation)" + (" and the categories of their objects"
                                                 if self.builder_config.objects else "")
                     + "."),
        features=tfds.features.FeaturesDict(features),
        homepage="https://cocodataset.org")

  def _split_generators(self, dl_manager):
    manual_dir = os.fspath(dl_manager.manual_dir)
    return {split: self._generate_examples(
                split, read_annotations(manual_dir, coco, self.builder_config.objects))
            for split, coco in present_splits(manual_dir).items()}

  def _generate_examples(self, split, examples):
    for ex in common.split_progress(examples, len(examples), f"coco_captions {split}"):
      read = self.read(split, ex["file"], common.read_image, ("JPEG",), "JPEG")
      if read is None:
        continue
      data, size = read
      if size != (ex["width"], ex["height"]):
        raise ValueError(f"{ex['file']}: decodes to width x height {size[0]} x {size[1]}, "
                         f"but the JSON says {ex['width']} x {ex['height']}")
      example = {"image": data, "image_id": ex["image_id"], "width": ex["width"],
                 "height": ex["height"], "captions": ex["captions"]}
      if self.builder_config.objects:
        example["objects"] = ex["objects"]
      yield ex["image_id"], example
