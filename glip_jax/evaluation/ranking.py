"""Rank of the correct answer among scored candidates, shared by zero-shot and retrieval metrics.

Definition used by every recall/top-k number in this package:

  rank = number of valid, non-matching candidates whose score is >= the best matching score.

A query is a hit at K iff rank < K. Ties therefore count *against* the query (pessimistic): a
collapsed model that gives every candidate the same score gets recall 0, not 1, and the result does
not depend on the order in which candidates happen to be stored. Several matching candidates (an
image's captions) are handled by taking the best one: "any match in the top K". NaN scores are
treated as -inf, so a NaN embedding can never produce a hit.
"""
import jax
import jax.numpy as jnp


def rank_of_best_positive(scores: jax.Array, positive: jax.Array,
                          valid: jax.Array | None = None) -> jax.Array:
  """Per query [Q]: count of valid non-positive candidates scoring >= the best positive."""
  scores = jnp.where(jnp.isnan(scores), -jnp.inf, scores.astype(jnp.float32))
  if valid is None:
    valid = jnp.ones(scores.shape[-1:], bool)
  positive = positive & valid
  best = jnp.max(jnp.where(positive, scores, -jnp.inf), axis=-1, keepdims=True)
  negatives = valid & ~positive
  return jnp.sum((scores >= best) & negatives, axis=-1)
