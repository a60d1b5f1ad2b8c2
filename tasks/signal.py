"""The learning-signal task: paired scorer difference between two models on held-out prompts."""
from __future__ import annotations

import json

from avr_core.signal import paired_difference
from avr_core.store import ArtifactRef
from tasks.common import Output, Spec, logger, stage


def learning_signal_spec(cfg: dict, base: ArtifactRef, trained: ArtifactRef) -> Spec:
    return Spec("signal", {}, (base, trained))


@stage(learning_signal_spec, retries=0, timeout_s=600)
def learning_signal(out: Output, cfg: dict, base: ArtifactRef, trained: ArtifactRef) -> None:
    """mean(r(trained) - r(base)) over held-out prompts, with its spread; written as signal.json."""
    score = lambda r: {x["id"]: x["answer_score"] for x in out.store.read_records(r)}  # noqa: E731
    result = {"base": str(base), "trained": str(trained), "scorer": cfg["scorer"]["kind"],
              **paired_difference(score(base), score(trained))}
    out.write_file("signal.json", json.dumps(result, indent=2).encode())
    out.extra["result"] = result
    logger().info("learning signal (%s scorer): mean diff %+.4f ± %.4f (se), 95%% CI %s, n=%d, trained better on %d",
                  result["scorer"], result["mean_diff"], result["se"], result["ci95"], result["n"], result["b_better"])
