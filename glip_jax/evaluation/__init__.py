"""Evaluation protocols (SPEC §6): zero-shot classification, retrieval, linear probe.

Each protocol is an `Evaluator` (`name`, `run(params) -> dict[str, float]`) built from injected
encoder callables and a function returning fresh eval batches; see base.py for the contracts.
"""
from glip_jax.evaluation.base import Evaluator, embed_images
from glip_jax.evaluation.linear_probe import LinearProbeEvaluator, linear_probe_metrics
from glip_jax.evaluation.retrieval import RetrievalEvaluator, retrieval_metrics
from glip_jax.evaluation.zeroshot import ZeroShotEvaluator, build_classifier, zeroshot_metrics

__all__ = [
    "Evaluator", "embed_images", "LinearProbeEvaluator",
    "linear_probe_metrics", "RetrievalEvaluator", "retrieval_metrics", "ZeroShotEvaluator",
    "build_classifier", "zeroshot_metrics",
]
