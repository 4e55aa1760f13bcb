"""The run summary: evaluations grouped, metrics ordered, chance levels computed by hand."""

from configs import demo
from glip_jax import report


def test_chance_levels_are_k_over_n():
  zeroshot = report.EvalDescription("zeroshot", num_classes=8, num_images=512)
  retrieval = report.EvalDescription("retrieval", num_images=512)
  assert report.chance_level("zeroshot_top1", zeroshot) == 1 / 8
  assert report.chance_level("zeroshot_top5", zeroshot) == 5 / 8
  assert report.chance_level("i2t_recall_at_10", retrieval) == 10 / 512
  assert report.chance_level("t2i_recall_at_1", retrieval) == 1 / 512
  assert report.chance_level("loss", retrieval) is None


def test_summary_groups_orders_and_explains():
  config = demo.get_config("none")  # trains unmasked
  config.evals.shape_masked = dict(kind="zeroshot", dataset=config.evals.shape.dataset.to_dict(),
                                   classnames="synthetic:shape", masking="train")
  results = {"eval/retrieval/t2i_recall_at_10": 0.3, "eval/retrieval/i2t_recall_at_5": 0.2,
             "eval/retrieval/i2t_recall_at_10": 0.25, "eval/retrieval/i2t_recall_at_1": 0.1,
             "eval/shape/zeroshot_top5": 0.9, "eval/shape/zeroshot_top1": 0.5,
             "eval/shape_masked/zeroshot_top1": 0.5, "steps": 800.0, "loss": 1.23456}
  text = report.format_run_summary(results, config, "/runs/demo", wall_seconds=151)
  lines = [line.strip() for line in text.splitlines()]
  retrieval = [l.split()[0] for l in lines[lines.index(next(l for l in lines if l.startswith(
      "retrieval"))) + 1:][:4]]
  assert retrieval == ["i2t_recall_at_1", "i2t_recall_at_5", "i2t_recall_at_10",
                       "t2i_recall_at_10"]
  assert "zeroshot_top1              0.5000   (chance 0.1250)" in lines
  assert "shape  (zeroshot, unmasked, 8 classes, 512 images)" in lines
  assert ("note: the run trains without masking, so this equals the unmasked evaluation"
          in lines)
  assert "wall time                2m 31s" in lines
  assert "final loss               1.2346" in lines
  assert "curves:      tensorboard --logdir /runs/demo   (pip install tensorboard)" in lines
