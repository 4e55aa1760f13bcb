"""An independent numpy forward of the image tower, from the parameter pytree alone."""

import jax
import numpy as np
from scipy import special  # scipy is a dependency of jax

from glip_jax.models import vit


def _layer_norm(x, p):
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean) ** 2).mean(-1, keepdims=True)
  return (x - mean) / np.sqrt(var + 1e-5) * p["norm"]["scale"] + p["norm"]["bias"]


def reference_vit(p, images, keep=None):
  """Returns (unnormalised embedding [B,E], each layer's [CLS] attention row [B,depth,heads,1+K])."""
  p = jax.tree.map(np.asarray, p)
  x = (images.astype(np.float32) - np.array(vit.CLIP_MEAN) * 255) / (np.array(vit.CLIP_STD) * 255)
  b, h, w, _ = x.shape
  ps = p["conv1"]["kernel"].shape[0]
  patches = x.reshape(b, h // ps, ps, w // ps, ps, 3).transpose(0, 1, 3, 2, 4, 5).reshape(
      b, -1, ps * ps * 3)
  tokens = patches @ p["conv1"]["kernel"].reshape(ps * ps * 3, -1) + p["positional_embedding"][1:]
  if keep is not None:
    tokens = np.stack([tokens[i, keep[i]] for i in range(b)])  # each token keeps its position
  cls = np.broadcast_to(p["class_embedding"] + p["positional_embedding"][0],
                        (b, 1, tokens.shape[-1]))
  x = _layer_norm(np.concatenate([cls, tokens], 1), p["ln_pre"])
  rows = []
  for i in range(len([k for k in p["transformer"] if k.startswith("resblocks")])):
    blk = p["transformer"][f"resblocks_{i}"]
    y = _layer_norm(x, blk["ln_1"])
    qkv = np.einsum("btd,dchk->btchk", y, blk["attn"]["in_proj"]["kernel"]) + blk["attn"]["in_proj"]["bias"]
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    att = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
    att = np.exp(att - att.max(-1, keepdims=True))
    att /= att.sum(-1, keepdims=True)
    rows.append(att[:, :, 0])
    o = np.einsum("bhqk,bkhd->bqhd", att, v)
    x = x + np.einsum("bqhd,hdo->bqo", o, blk["attn"]["out_proj"]["kernel"]) + blk["attn"]["out_proj"]["bias"]
    y = _layer_norm(x, blk["ln_2"])
    hdn = y @ blk["mlp"]["c_fc"]["kernel"] + blk["mlp"]["c_fc"]["bias"]
    hdn = 0.5 * hdn * (1 + special.erf(hdn / np.sqrt(2)))
    x = x + hdn @ blk["mlp"]["c_proj"]["kernel"] + blk["mlp"]["c_proj"]["bias"]
  return _layer_norm(x[:, 0], p["ln_post"]) @ p["proj"], np.stack(rows, axis=1)
