"""Training tasks (docs/DESIGN.md step 6): reference log-probs, RSFT and preference optimisation.
Each trains in a supervised subprocess (tasks/runtime/supervision.py: checkpoints, resume,
object-store sync, several GPUs or nodes)."""
from __future__ import annotations

from avr_core.losses import NEEDS_REFERENCE
from avr_core.store import ArtifactRef, Store
from tasks.runtime import Output, Spec, model_artifacts, policy_identity, stage
from tasks.runtime.supervision import free_accelerators, run_training


def policy_of(cfg: dict, model: ArtifactRef) -> dict:
    """A trained model artifact as a policy config (its cache identity: see policy_identity)."""
    return {"path": f"{Store.of(cfg).url(model)}/model", "dtype": cfg["policy"]["dtype"],
            "trust_remote_code": False, "artifact": str(model)}


def _pairs_rows(store: Store, pairs: ArtifactRef) -> list[dict]:
    return store.read_records(pairs, "pairs")


# -- reference log-probs ----------------------------------------------------------------------
def reference_logps_spec(cfg: dict, reference: dict, pairs: ArtifactRef, section: str = "po") -> Spec:
    keyed = {"reference": policy_identity(reference), "max_length": cfg[section]["max_length"]}
    return Spec("ref_logps", keyed, (pairs,), tuple(model_artifacts(cfg, reference)))


@stage(reference_logps_spec, retries=1, timeout_s=12 * 3600)
def reference_logps(out: Output, cfg: dict, reference: dict, pairs: ArtifactRef, section: str = "po") -> None:
    """log pi_ref(chosen), log pi_ref(rejected) for every pair, computed once and stored, so
    preference training does zero reference-model forward passes."""
    from transformers import AutoTokenizer

    from avr_core.model_refs import resolve_model_path
    from avr_core.training.data import tokenize_pairs
    from avr_core.training.logps import compute_reference_logps

    free_accelerators("reference_logps")
    path = resolve_model_path(reference["path"])
    examples, counts = tokenize_pairs(_pairs_rows(out.store, pairs), AutoTokenizer.from_pretrained(path),
                                      cfg[section]["max_length"])
    device = cfg[section].get("device", "auto")
    rows = compute_reference_logps(path, examples, batch_size=cfg[section]["ref_batch_size"],
                                   token_budget=cfg[section]["ref_token_budget"], dtype=reference["dtype"],
                                   device=device, progress=True,
                                   on_batch=out.progress_hook("forward passes")) if examples else []
    from avr_core.backends.device import place
    out.extra["device"] = {"reference": place(path, reference["dtype"], device, key=f"{section}.device").label}
    out.commit({"records": rows}, {f"tokenize_{k}": v for k, v in counts.items()})


# -- training ---------------------------------------------------------------------------------
def _train_spec(cfg: dict, stage_name: str, base: dict, inputs: tuple) -> Spec:
    return Spec(stage_name, {stage_name: cfg[stage_name], "base": policy_identity(base)}, inputs,
                tuple(model_artifacts(cfg, base)))


def train_sft_spec(cfg, base, data, section="rsft"):
    return _train_spec(cfg, section, base, (data,))


@stage(train_sft_spec, retries=1, timeout_s=72 * 3600)
def train_sft(out: Output, cfg: dict, base: dict, data: ArtifactRef, section: str = "rsft") -> None:
    """Supervised fine-tuning of `base` on the `sft` rows of `data`: RSFT on the selected
    refinement conversations (section rsft), CoT RSFT on long thoughts (section cot_sft)."""
    run_training(out, cfg, section, base, data, out.store.read_records(data, "rsft"), None)


def train_po_spec(cfg, base, pairs, ref_logps, section="po"):
    return _train_spec(cfg, section, base, (pairs, ref_logps))


@stage(train_po_spec, retries=1, timeout_s=72 * 3600)
def train_po(out: Output, cfg: dict, base: dict, pairs: ArtifactRef, ref_logps: ArtifactRef,
             section: str = "po") -> None:
    """Preference optimisation (cfg.<section>.loss; the paper: dpo) of `base`, which is also
    the reference model whose log-probs `ref_logps` holds."""
    refs = ref_logps if cfg[section]["loss"] in NEEDS_REFERENCE else None
    run_training(out, cfg, section, base, pairs, _pairs_rows(out.store, pairs), refs)
