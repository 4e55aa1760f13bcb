"""Prompt templates for zero-shot classification, and loading of user template/class-name files.

A template is a string with exactly one `{}` placeholder for the class name. The two built-in sets
are from OpenAI CLIP's notebook `notebooks/Prompt_Engineering_for_ImageNet.ipynb` (MIT licence):
the 80 ImageNet templates and the 7-template subset the notebook found to work about as well.
"""
import json
from collections.abc import Sequence

from glip_jax import storage

PLACEHOLDER = "{}"

CLIP_IMAGENET_TEMPLATES: tuple[str, ...] = (
    "a bad photo of a {}.",
    "a photo of many {}.",
    "a sculpture of a {}.",
    "a photo of the hard to see {}.",
    "a low resolution photo of the {}.",
    "a rendering of a {}.",
    "graffiti of a {}.",
    "a bad photo of the {}.",
    "a cropped photo of the {}.",
    "a tattoo of a {}.",
    "the embroidered {}.",
    "a photo of a hard to see {}.",
    "a bright photo of a {}.",
    "a photo of a clean {}.",
    "a photo of a dirty {}.",
    "a dark photo of the {}.",
    "a drawing of a {}.",
    "a photo of my {}.",
    "the plastic {}.",
    "a photo of the cool {}.",
    "a close-up photo of a {}.",
    "a black and white photo of the {}.",
    "a painting of the {}.",
    "a painting of a {}.",
    "a pixelated photo of the {}.",
    "a sculpture of the {}.",
    "a bright photo of the {}.",
    "a cropped photo of a {}.",
    "a plastic {}.",
    "a photo of the dirty {}.",
    "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.",
    "a photo of the {}.",
    "a good photo of the {}.",
    "a rendering of the {}.",
    "a {} in a video game.",
    "a photo of one {}.",
    "a doodle of a {}.",
    "a close-up photo of the {}.",
    "a photo of a {}.",
    "the origami {}.",
    "the {} in a video game.",
    "a sketch of a {}.",
    "a doodle of the {}.",
    "a origami {}.",
    "a low resolution photo of a {}.",
    "the toy {}.",
    "a rendition of the {}.",
    "a photo of the clean {}.",
    "a photo of a large {}.",
    "a rendition of a {}.",
    "a photo of a nice {}.",
    "a photo of a weird {}.",
    "a blurry photo of a {}.",
    "a cartoon {}.",
    "art of a {}.",
    "a sketch of the {}.",
    "a embroidered {}.",
    "a pixelated photo of a {}.",
    "itap of the {}.",
    "a jpeg corrupted photo of the {}.",
    "a good photo of a {}.",
    "a plushie {}.",
    "a photo of the nice {}.",
    "a photo of the small {}.",
    "a photo of the weird {}.",
    "the cartoon {}.",
    "art of the {}.",
    "a drawing of the {}.",
    "a photo of the large {}.",
    "a black and white photo of a {}.",
    "the plushie {}.",
    "a dark photo of a {}.",
    "itap of a {}.",
    "graffiti of the {}.",
    "a toy {}.",
    "itap of my {}.",
    "a photo of a cool {}.",
    "a photo of a small {}.",
    "a tattoo of the {}.",
)

CLIP_IMAGENET_SHORT_TEMPLATES: tuple[str, ...] = (
    "itap of a {}.",
    "a bad photo of the {}.",
    "a origami {}.",
    "a photo of the large {}.",
    "a {} in a video game.",
    "art of the {}.",
    "a photo of the small {}.",
)

# Names accepted wherever a template set is configured; anything else is read as a file path.
TEMPLATE_SETS: dict[str, tuple[str, ...]] = {
    "clip_imagenet_80": CLIP_IMAGENET_TEMPLATES,
    "clip_imagenet_7": CLIP_IMAGENET_SHORT_TEMPLATES,
    "class_name": ("{}",),
}


def validate_templates(templates: Sequence[str]) -> tuple[str, ...]:
  """Returns `templates` as a tuple; raises unless each has exactly one `{}`."""
  if not templates:
    raise ValueError("Empty template set.")
  for i, template in enumerate(templates):
    if template.count(PLACEHOLDER) != 1:
      raise ValueError(f"Template {i} ({template!r}) must contain exactly one '{{}}' placeholder.")
  return tuple(templates)


def fill_template(template: str, classname: str) -> str:
  """Puts `classname` into the `{}` of `template`."""
  # str.replace rather than str.format: user templates may contain other braces.
  return template.replace(PLACEHOLDER, classname)


def prompts_for_class(templates: Sequence[str], classname: str) -> list[str]:
  """All prompts for one class, one per template, in template order."""
  return [fill_template(t, classname) for t in templates]


def _read_string_list(path: str, json_key: str) -> list[str]:
  """Strings from a JSON file (list, or dict with `json_key`) or a text file (one per line)."""
  text = storage.path(path).read_text()  # local, gs:// or s3:// (glip_jax/storage.py)
  if path.endswith(".json"):
    data = json.loads(text)
    if isinstance(data, dict):
      if json_key not in data:
        raise ValueError(f"{path}: a JSON object must have a {json_key!r} key.")
      data = data[json_key]
    if not isinstance(data, list) or not all(isinstance(s, str) for s in data):
      raise ValueError(f"{path}: expected a JSON list of strings.")
    return data
  # Blank lines are skipped so that a trailing newline does not create an empty entry.
  return [line.strip() for line in text.splitlines() if line.strip()]


def load_templates(path: str) -> tuple[str, ...]:
  """Reads templates from a text file (one per line) or JSON (list or {"templates": [...]})."""
  return validate_templates(_read_string_list(path, "templates"))


def load_classnames(path: str) -> tuple[str, ...]:
  """Reads class names, in label order, from a text file (one per line) or JSON.

  JSON may be a list, {"classnames": [...]}, or {"0": "tench", "1": ...} mapping every label index
  0..C-1 to its name.
  """
  if path.endswith(".json"):
    data = json.loads(storage.path(path).read_text())
    if isinstance(data, dict) and "classnames" not in data:
      indices = sorted(int(k) for k in data)
      if indices != list(range(len(indices))):
        raise ValueError(f"{path}: label indices must be exactly 0..{len(indices) - 1}.")
      return tuple(data[str(i)] for i in indices)
  names = tuple(_read_string_list(path, "classnames"))
  if not names:
    raise ValueError(f"{path}: no class names.")
  return names


def resolve_templates(spec: str | Sequence[str]) -> tuple[str, ...]:
  """Template set from a built-in name (see TEMPLATE_SETS), a file path, or a sequence."""
  if not isinstance(spec, str):
    return validate_templates(spec)
  if spec in TEMPLATE_SETS:
    return TEMPLATE_SETS[spec]
  if storage.path(spec).exists():
    return load_templates(spec)
  raise ValueError(
      f"Unknown template set {spec!r}: use one of {sorted(TEMPLATE_SETS)} or an existing file.")
