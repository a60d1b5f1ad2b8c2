"""The learning-signal task: paired scorer difference between two models on held-out prompts."""
from __future__ import annotations

import json

import avr_core.signal
from avr_core.signal import paired_difference
from avr_core.store import ArtifactRef, cache_key, code_version
from tasks.common import check_inputs, logger, stage_task, store_of

_CODE = code_version(avr_core.signal)


def learning_signal_ref(cfg: dict, base: ArtifactRef, trained: ArtifactRef) -> ArtifactRef:
    return store_of(cfg).ref("signal", cache_key("signal", {}, [str(base), str(trained)], _CODE))


@stage_task(learning_signal_ref, retries=0, timeout_s=600)
def learning_signal(cfg: dict, base: ArtifactRef, trained: ArtifactRef) -> ArtifactRef:
    """mean(r(trained) - r(base)) over held-out prompts, with its spread; written as signal.json."""
    store, ref = store_of(cfg), learning_signal_ref(cfg, base, trained)
    if store.exists(ref):
        return ref
    check_inputs(store, ref, [base, trained])
    score = lambda r: {x["id"]: x["answer_score"] for x in store.read_records(r)}  # noqa: E731
    result = {"base": str(base), "trained": str(trained), "scorer": cfg["scorer"]["kind"],
              **paired_difference(score(base), score(trained))}
    w = store.writer(ref.stage, ref.key, {}, [base, trained], _CODE)
    w.write_file("signal.json", json.dumps(result, indent=2).encode())
    logger().info("learning signal (%s scorer): mean diff %+.4f ± %.4f (se), 95%% CI %s, n=%d, trained better on %d",
                  result["scorer"], result["mean_diff"], result["se"], result["ci95"], result["n"], result["b_better"])
    return w.finalize(extra={"result": result})
