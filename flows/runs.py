"""Run bookkeeping shared by flows: load + validate config and inputs, save the resolved
config, and write a run summary (which stages came from cache) at the end."""
from __future__ import annotations

import json
import time
import uuid

from omegaconf import OmegaConf

from avr_core.config import load_config, to_yaml
from avr_core.store import ArtifactRef, Store
from tasks.synthesis import validate_prompts


def start_run(preset: str, overrides: list[str] | tuple[str, ...]) -> tuple[dict, dict]:
    """Everything that can reject a run happens here, before any stage runs."""
    cfg_obj = load_config(preset, list(overrides))
    cfg = OmegaConf.to_container(cfg_obj, resolve=True)
    n = validate_prompts(cfg)
    store = Store(cfg["store"]["root"])
    run_id = time.strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]
    store.write_atomic(f"{store._p('runs', run_id)}/config.yaml", to_yaml(cfg_obj).encode())
    print(f"run {run_id}: preset={preset} overrides={list(overrides)} prompts={n} store={cfg['store']['root']}")
    return {"id": run_id, "started": time.time(), "preset": preset, "overrides": list(overrides)}, cfg


def finish_run(run: dict, cfg: dict, outputs: dict[str, ArtifactRef]) -> dict:
    store = Store(cfg["store"]["root"])
    summary = {**run, "wall_s": round(time.time() - run["started"], 1),
               "outputs": {k: {"ref": str(v), "path": v.path, "counts": store.manifest(v)["counts"],
                               "rows": store.manifest(v)["rows"]} for k, v in outputs.items()}}
    store.write_atomic(f"{store._p('runs', run['id'])}/summary.json", json.dumps(summary, indent=2).encode())
    for name, out in summary["outputs"].items():
        print(f"{name}: {out['path']}\n  rows={out['rows']}\n  counts={out['counts']}")
    return summary
