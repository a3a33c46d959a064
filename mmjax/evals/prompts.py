"""Named prompt-template lists for zero-shot classification.

A zero-shot evaluator's `templates` (and a TFDS source's `data.prompt_templates`) may
name a list here instead of, or beside, format strings: `templates=('imagenet_clip',)`
is CLIP's published ensemble of 80 ImageNet prompts (Radford et al. 2021, the prompt
engineering notebook of OpenAI's CLIP repository), `'imagenet_clip_7'` the 7 of them
that notebook selects. Each class's text embedding is then the normalised mean of its
prompts' normalised embeddings, as CLIP's evaluation computes it
(`mmjax.evals.classification.zero_shot_classifier`). Presets are used verbatim (CLIP's
evaluation writes 'a photo of a {}.' also before a vowel).
"""

from __future__ import annotations

from typing import Sequence

IMAGENET_CLIP = (
    'a bad photo of a {}.', 'a photo of many {}.', 'a sculpture of a {}.',
    'a photo of the hard to see {}.', 'a low resolution photo of the {}.',
    'a rendering of a {}.', 'graffiti of a {}.', 'a bad photo of the {}.',
    'a cropped photo of the {}.', 'a tattoo of a {}.', 'the embroidered {}.',
    'a photo of a hard to see {}.', 'a bright photo of a {}.', 'a photo of a clean {}.',
    'a photo of a dirty {}.', 'a dark photo of the {}.', 'a drawing of a {}.',
    'a photo of my {}.', 'the plastic {}.', 'a photo of the cool {}.',
    'a close-up photo of a {}.', 'a black and white photo of the {}.',
    'a painting of the {}.', 'a painting of a {}.', 'a pixelated photo of the {}.',
    'a sculpture of the {}.', 'a bright photo of the {}.', 'a cropped photo of a {}.',
    'a plastic {}.', 'a photo of the dirty {}.', 'a jpeg corrupted photo of a {}.',
    'a blurry photo of the {}.', 'a photo of the {}.', 'a good photo of the {}.',
    'a rendering of the {}.', 'a {} in a video game.', 'a photo of one {}.',
    'a doodle of a {}.', 'a close-up photo of the {}.', 'a photo of a {}.',
    'the origami {}.', 'the {} in a video game.', 'a sketch of a {}.',
    'a doodle of the {}.', 'a origami {}.', 'a low resolution photo of a {}.',
    'the toy {}.', 'a rendition of the {}.', 'a photo of the clean {}.',
    'a photo of a large {}.', 'a rendition of a {}.', 'a photo of a nice {}.',
    'a photo of a weird {}.', 'a blurry photo of a {}.', 'a cartoon {}.',
    'art of a {}.', 'a sketch of the {}.', 'a embroidered {}.',
    'a pixelated photo of a {}.', 'itap of the {}.',
    'a jpeg corrupted photo of the {}.', 'a good photo of a {}.', 'a plushie {}.',
    'a photo of the nice {}.', 'a photo of the small {}.', 'a photo of the weird {}.',
    'the cartoon {}.', 'art of the {}.', 'a drawing of the {}.',
    'a photo of the large {}.', 'a black and white photo of a {}.', 'the plushie {}.',
    'a dark photo of a {}.', 'itap of a {}.', 'graffiti of the {}.', 'a toy {}.',
    'itap of my {}.', 'a photo of a cool {}.', 'a photo of a small {}.',
    'a tattoo of the {}.',
)

IMAGENET_CLIP_7 = (
    'itap of a {}.', 'a bad photo of the {}.', 'a origami {}.',
    'a photo of the large {}.', 'a {} in a video game.', 'art of the {}.',
    'a photo of the small {}.',
)

# name -> templates (format strings with one '{}' for the class name).
PRESETS = {"imagenet_clip": IMAGENET_CLIP, "imagenet_clip_7": IMAGENET_CLIP_7}


def expand(templates: Sequence[str], where: str = "templates") -> list[tuple[str, bool]]:
  """(template, from a preset) for each entry of `templates`, a preset name expanded
  in place into its list. An entry that is neither a preset name nor a format string
  with exactly one '{}' is a ValueError naming `where` and listing the presets."""
  if isinstance(templates, str) or not templates:
    raise ValueError(f"{where}: expected a non-empty list of format strings or preset "
                     f"names ({sorted(PRESETS)}), got {templates!r}")
  out = []
  for t in templates:
    if isinstance(t, str) and t in PRESETS:
      out += [(p, True) for p in PRESETS[t]]
    elif isinstance(t, str) and t.count("{}") == 1:
      out.append((t, False))
    else:
      raise ValueError(f"{where}: {t!r} is neither a template with exactly one '{{}}' "
                       f"for the class name nor a preset ({sorted(PRESETS)})")
  return out
