"""Tokenizer: golden CLIP BPE ids (checked against the byte-level vocabulary layout), cleaning,
truncation, padding, SentencePiece option and pickling."""

import pickle

import numpy as np
import pytest

from glip_jax.data.tokenizer import CLIP_EOT, CLIP_SOT, Tokenizer, clean_text

# CLIP's vocabulary starts with the 256 byte symbols in bytes_to_unicode order ('!' = 0 … ) and then
# the same 256 with '</w>' appended, so a single character word c (printable ASCII) is
# 256 + ord(c) - 33: 'a</w>' = 320, 'b</w>' = 321, '&</w>' = 261, ','</w> = 267, '!</w>' = 256,
# '1</w>' = 272. Whole-word ids below are the published CLIP ids ('photo' 1125, 'of' 539, 'cat'
# 2368, 'hello' 3306, 'world' 1002).
GOLDEN = {
    "a photo of a cat": [CLIP_SOT, 320, 1125, 539, 320, 2368, CLIP_EOT],
    "A PHOTO  of\ta\n cat ": [CLIP_SOT, 320, 1125, 539, 320, 2368, CLIP_EOT],
    "hello, world!": [CLIP_SOT, 3306, 267, 1002, 256, CLIP_EOT],
    "a&amp;b": [CLIP_SOT, 320, 261, 321, CLIP_EOT],  # html entity → '&'
    "a&amp;amp;b": [CLIP_SOT, 320, 261, 321, CLIP_EOT],  # unescaped twice, as open_clip
    "a 1 b": [CLIP_SOT, 320, 272, 321, CLIP_EOT],
    # CLIP's pre-tokeniser splits every digit into its own word ([\p{N}]), so each ends in '</w>'.
    "12": [CLIP_SOT, 272, 273, CLIP_EOT],
}


@pytest.fixture(scope="module")
def tokenizer():
  return Tokenizer(context_length=12)


@pytest.mark.parametrize("text", list(GOLDEN))
def test_golden_ids(tokenizer, text):
  expected = GOLDEN[text]
  row = tokenizer([text])[0]
  assert row.dtype == np.int32 and row.shape == (12,)
  assert row[: len(expected)].tolist() == expected
  assert not row[len(expected) :].any()


def test_cleaning_matches_open_clip():
  assert clean_text("  Caf\u00e9 &amp;amp;  NA\u00cfVE\n") == "caf\u00e9 & na\u00efve"
  assert clean_text("mojibake: \u00e2\u0080\u0099") == "mojibake: '"  # ftfy repairs it.


def test_unicode_is_tokenised_not_dropped(tokenizer):
  row = tokenizer(["café"])[0]
  assert row[0] == CLIP_SOT and CLIP_EOT in row.tolist() and (row > 0).sum() >= 3


def test_truncation_keeps_eot_last(tokenizer):
  row = tokenizer(["a " * 40])[0]
  assert row.tolist() == [CLIP_SOT] + [320] * 10 + [CLIP_EOT]


def test_default_context_length_and_batch():
  out = Tokenizer()(["a photo of a cat", "", "b"])
  assert out.shape == (3, 77) and out.dtype == np.int32
  assert out[1, :2].tolist() == [CLIP_SOT, CLIP_EOT]
  assert out[2, :3].tolist() == [CLIP_SOT, 321, CLIP_EOT]


def test_rejects_a_bare_string(tokenizer):
  with pytest.raises(TypeError):
    tokenizer("a cat")


def test_pickles_for_grain_workers(tokenizer):
  clone = pickle.loads(pickle.dumps(tokenizer))
  np.testing.assert_array_equal(clone(["a photo of a cat"]), tokenizer(["a photo of a cat"]))


def test_sentencepiece_option(tmp_path):
  import sentencepiece

  corpus = tmp_path / "corpus.txt"
  corpus.write_text(
      "\n".join(
          f"a photo of a {c} {s}"
          for c in "red blue green".split()
          for s in "cat dog star ring".split()
      )
      * 5
  )
  sentencepiece.SentencePieceTrainer.train(
      input=str(corpus),
      model_prefix=str(tmp_path / "sp"),
      vocab_size=40,
      hard_vocab_limit=False,
      bos_id=1,
      eos_id=2,
      pad_id=0,
      unk_id=3,
      minloglevel=2,
  )
  tok = Tokenizer(context_length=6, kind="sentencepiece", model_path=str(tmp_path / "sp.model"))
  out = tok(["A photo of a red cat", "red"])
  assert out.shape == (2, 6) and out[0, 0] == 1 and out[0, -1] == 2  # truncated, EOS kept last
  assert 2 in out[1].tolist() and out[1, -1] == 0
  np.testing.assert_array_equal(pickle.loads(pickle.dumps(tok))(["red"]), tok(["red"]))


def test_bad_arguments():
  with pytest.raises(ValueError, match="kind"):
    Tokenizer(kind="bert")
  with pytest.raises(ValueError, match="model_path"):
    Tokenizer(kind="sentencepiece")
