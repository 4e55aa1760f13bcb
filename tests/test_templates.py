"""Prompt templates, class-name lists and loading them from user files."""
import json

import pytest

from glip_jax.evaluation import classnames
from glip_jax.evaluation import templates


def test_clip_template_sets_have_published_sizes_and_content():
  assert len(templates.CLIP_IMAGENET_TEMPLATES) == 80
  assert len(set(templates.CLIP_IMAGENET_TEMPLATES)) == 80
  assert templates.CLIP_IMAGENET_TEMPLATES[0] == "a bad photo of a {}."
  assert templates.CLIP_IMAGENET_TEMPLATES[-1] == "a tattoo of the {}."
  assert templates.CLIP_IMAGENET_SHORT_TEMPLATES == (
      "itap of a {}.", "a bad photo of the {}.", "a origami {}.", "a photo of the large {}.",
      "a {} in a video game.", "art of the {}.", "a photo of the small {}.")
  # The short set is a subset chosen from the 80.
  assert set(templates.CLIP_IMAGENET_SHORT_TEMPLATES) <= set(templates.CLIP_IMAGENET_TEMPLATES)


def test_templates_format_with_class_name():
  prompts = templates.prompts_for_class(templates.CLIP_IMAGENET_SHORT_TEMPLATES, "goldfish")
  assert prompts[0] == "itap of a goldfish."
  assert prompts[4] == "a goldfish in a video game."
  for prompt in templates.prompts_for_class(templates.CLIP_IMAGENET_TEMPLATES, "goldfish"):
    assert "{}" not in prompt and prompt.count("goldfish") == 1
  # Other braces in a user template are left alone.
  assert templates.fill_template("{x} a {}", "cat") == "{x} a cat"


@pytest.mark.parametrize("bad", [["no placeholder"], ["two {} {}"], []])
def test_invalid_templates_are_rejected(bad):
  with pytest.raises(ValueError):
    templates.validate_templates(bad)


def test_load_templates_from_text_and_json(tmp_path):
  txt = tmp_path / "t.txt"
  txt.write_text("a photo of a {}.\n\n  a drawing of a {}.  \n")
  assert templates.load_templates(str(txt)) == ("a photo of a {}.", "a drawing of a {}.")
  js = tmp_path / "t.json"
  js.write_text(json.dumps({"templates": ["{} here"]}))
  assert templates.load_templates(str(js)) == ("{} here",)
  js.write_text(json.dumps(["a {}", "b {}"]))
  assert templates.resolve_templates(str(js)) == ("a {}", "b {}")
  txt.write_text("missing placeholder\n")
  with pytest.raises(ValueError, match="placeholder"):
    templates.load_templates(str(txt))


def test_resolve_templates_by_name_and_unknown_name():
  assert len(templates.resolve_templates("clip_imagenet_80")) == 80
  assert len(templates.resolve_templates("clip_imagenet_7")) == 7
  assert templates.resolve_templates(["x {}"]) == ("x {}",)
  with pytest.raises(ValueError, match="clip_imagenet_80"):
    templates.resolve_templates("clip_imagenet_81")


def test_load_classnames_from_text_and_json(tmp_path):
  txt = tmp_path / "c.txt"
  txt.write_text("cat\ndog\n")
  assert templates.load_classnames(str(txt)) == ("cat", "dog")
  js = tmp_path / "c.json"
  js.write_text(json.dumps({"1": "dog", "0": "cat", "2": "bird"}))
  assert templates.load_classnames(str(js)) == ("cat", "dog", "bird")
  js.write_text(json.dumps({"0": "cat", "2": "bird"}))
  with pytest.raises(ValueError, match="indices"):
    templates.load_classnames(str(js))
  js.write_text(json.dumps(["cat", "dog"]))
  assert templates.load_classnames(str(js)) == ("cat", "dog")


def test_classname_lists():
  assert len(classnames.IMAGENET_CLASSNAMES) == 1000
  # Spot checks at known ImageNet label indices.
  assert classnames.IMAGENET_CLASSNAMES[0] == "tench"
  assert classnames.IMAGENET_CLASSNAMES[281] == "tabby cat"
  assert classnames.IMAGENET_CLASSNAMES[817] == "sports car"
  assert classnames.IMAGENET_CLASSNAMES[999] == "toilet paper"
  assert len(classnames.CIFAR10_CLASSNAMES) == 10
  assert len(set(classnames.CIFAR100_CLASSNAMES)) == 100
  # TFDS orders CIFAR-100 fine labels alphabetically.
  assert list(classnames.CIFAR100_CLASSNAMES) == sorted(classnames.CIFAR100_CLASSNAMES)
  assert classnames.classnames_from_label_names(["maple_tree", "cat"]) == ("maple tree", "cat")
