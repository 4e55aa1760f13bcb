"""MaskingSpec: the static, validated description of a token-selection strategy."""

import dataclasses
import math

import ml_collections

KINDS = ("none", "random", "gaussian", "attentive", "cluster", "pgs", "grid", "block")

# Per-kind fields left at None take the published recipe's value: cluster masking's README
# (anchors 3%, no embedding mix) and CLIP-PGS's clip-train.sh (anchors 5%, embedding mix ramped
# to 1).
KIND_DEFAULTS = {
    "cluster": dict(anchor_ratio=0.03, embed_mix=0.0),
    "pgs": dict(anchor_ratio=0.05, embed_mix=1.0),
}
GENERIC_DEFAULTS = dict(anchor_ratio=0.05, embed_mix=0.0)


def _fail(field: str, value, allowed: str) -> None:
  raise ValueError(f"masking.{field}={value!r} is not allowed; allowed: {allowed}.")


@dataclasses.dataclass(frozen=True)
class MaskingSpec:
  """Static description of a token-selection strategy (hashable, so it can close over jit).

  Every kind keeps K = num_kept(N, ratio) patches. Fields other than kind/ratio apply to the kinds
  named in their comment and are ignored by the others.
  """

  kind: str = "none"
  ratio: float = 0.0  # the *dropped* fraction of patches (FLIP, GLIP; PGS's min_mask_ratio)
  # gaussian (GLIP)
  sigma: float = 0.2  # GLIP width; a variance by default (the authors' code), see sigma_is_variance
  sigma_is_variance: bool = True
  strength: float = 1.0  # multiplies the prior; decouples the prior's height from its width
  gumbel: bool = False  # exact sampling without replacement ∝ prior**strength (Gumbel-top-K)
  # cluster, pgs
  anchor_ratio: float | None = None  # fraction of patches drawn as cluster anchors (None: kind's)
  threshold: float | None = None  # fixed similarity threshold; None = exact per-image (static K)
  embed_mix: float | None = None  # final weight of the embedding cosine, ramped in by progress
  as_coded: bool = False  # the reference code's behaviour (see docs/masking.md)
  # pgs
  edge_weight: float = 1.0  # how strongly Sobel edges protect patches (keep-score units)
  otn: bool = True  # optimal-transport normalisation of the similarity (Sinkhorn)
  sinkhorn_iters: int = 50
  temperature: float = 0.1  # Sinkhorn kernel exp(S / temperature), S a cosine in [-1, 1]
  # grid (CLIPA)
  window: int = 2  # keep one patch per window×window cell
  # block (CLIPA)
  max_aspect: float = 4.0  # the kept rectangle's height/width lies in [1/max_aspect, max_aspect]

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f"masking.kind={self.kind!r} is not a masking kind; allowed: {list(KINDS)}.")
    if not 0.0 <= self.ratio < 1.0:
      raise ValueError(f"masking.ratio={self.ratio!r} is outside the allowed range [0, 1) "
                       f"(it is the dropped fraction of patches).")
    if self.kind == "gaussian" and self.sigma <= 0:
      raise ValueError(f"masking.sigma={self.sigma!r} must be > 0 for kind 'gaussian'.")
    if self.strength < 0:
      raise ValueError(f"masking.strength={self.strength!r} must be >= 0.")
    # A frozen dataclass: resolve the kind's defaults in place, so equal strategies hash equal.
    for name, value in KIND_DEFAULTS.get(self.kind, GENERIC_DEFAULTS).items():
      if getattr(self, name) is None:
        object.__setattr__(self, name, value)
    if not 0.0 < self.anchor_ratio < 1.0:
      _fail("anchor_ratio", self.anchor_ratio, "a fraction in (0, 1)")
    if self.threshold is not None and not -1.0 <= self.threshold <= 1.0:
      _fail("threshold", self.threshold, "None or a cosine similarity in [-1, 1]")
    if not 0.0 <= self.embed_mix <= 1.0:
      _fail("embed_mix", self.embed_mix, "a weight in [0, 1]")
    if self.edge_weight < 0:
      _fail("edge_weight", self.edge_weight, "a weight >= 0")
    if not isinstance(self.sinkhorn_iters, int) or self.sinkhorn_iters < 1:
      _fail("sinkhorn_iters", self.sinkhorn_iters, "an int >= 1")
    if not self.temperature > 0:
      _fail("temperature", self.temperature, "a float > 0")
    if not isinstance(self.window, int) or self.window < 2:
      _fail("window", self.window, "an int >= 2")
    if not self.max_aspect >= 1.0:
      _fail("max_aspect", self.max_aspect, "a float >= 1")

  @property
  def active(self) -> bool:
    """Whether any patch is dropped (kind 'none' or ratio 0 keep the full sequence)."""
    return self.kind != "none" and self.ratio > 0

  def num_anchors(self, num_patches: int) -> int:
    """Cluster anchors A = N − int(N·(1 − anchor_ratio)), at least 1 (as both reference codes)."""
    return max(1, num_patches - int(num_patches * (1.0 - self.anchor_ratio) + 1e-6))


def from_config(config: ml_collections.ConfigDict) -> MaskingSpec:
  """Builds (and validates) a MaskingSpec from the `masking` section of a config."""
  fields = {f.name for f in dataclasses.fields(MaskingSpec)}
  unknown = set(config.keys()) - fields
  if unknown:
    raise ValueError(f"masking has unknown fields {sorted(unknown)}; allowed: {sorted(fields)}.")
  return MaskingSpec(**config.to_dict())


def num_kept(num_patches: int, ratio: float) -> int:
  """K = max(1, floor(N·(1−ratio))), robust to float round-off (e.g. 20·(1−0.9))."""
  return max(1, int(math.floor(num_patches * (1.0 - ratio) + 1e-6)))
