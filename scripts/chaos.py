"""kill -9 chaos: SIGKILL a running sampling stage and a running training stage, resume, repeat.

    .venv/bin/python scripts/chaos.py --kills 20 --seed 0 --store /tmp/avr-chaos    # ~4 min, 2 cores

A small driver (this file, `drive`) runs the stage-1 synthesis flow (prompts, respond,
critique, refine, rm_score, select) and an RSFT training stage (DeepSpeed subprocess) on a tiny
random Llama that carries the real SmolLM2 tokenizer, as a Prefect flow against a Prefect server
that outlives the kills, on CPU, from a snapshot of the code (`<store>/src`). It runs once
uninterrupted into `<store>/reference`, then again into `<store>/chaos`, where the driver's whole
process group (the flow, the training subprocess) is SIGKILLed at seeded random points and
restarted until it finishes. The first half of the kills go to the sampling stages, the rest to
training: each waits for new progress there (a shard committed; an optimizer step past the one
the previous kill interrupted), then a random delay of up to ~1.5 shards / 1 step, so kills land
mid-shard, in a commit, between stages, mid-step and mid-checkpoint.

Then it checks, and exits 1 on any failure: the row count of every artifact is exact, record
ids are unique, every manifest verifies (`avr artifacts verify`), every file is byte-identical
to the reference run's (train_summary.json / metrics.jsonl: timings aside, the losses equal),
the manifests' row and filter counts are equal, the trained weights are bit-identical, no
process of a killed group survived, no shard committed before a kill was computed again,
training never resumed from an earlier checkpoint than the last one committed, and no
temporary file, lock file or checkpoint directory is left over.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SAMPLING = ["respond", "critique", "refine", "rm_score"]           # sharded stages that run a model
PHASES = ["prompts", *SAMPLING, "select", "rsft"]                   # in run order; rsft = training
ENV = {"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
       "AVR_RETRY_DELAY_S": "0", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
       "PREFECT_LOGGING_LEVEL": "WARNING"}


# -- the run under test ---------------------------------------------------------------------------
def build_model(path: Path) -> str:
    """A tiny random Llama (hidden 64, 2 layers, seeded) with the real SmolLM2 tokenizer and
    chat template (as tests/training/conftest.py): a forward pass takes milliseconds on a CPU.

    One thing is planted so that the pipeline has data to pass on: after any token but a digit
    the digits 1-9 get a logit boost, after a digit "]]" does. Greedy decoding therefore
    completes a forced "Rating: [[" with "7]]"-like text (the critique stage keeps a rating),
    while sampled text stays mostly random tokens and the judge's expected rating still varies
    with the context (the random layers)."""
    if (path / "model.safetensors").exists():
        return str(path)
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from avr_core.model_refs import resolve_model_path

    tok = AutoTokenizer.from_pretrained(resolve_model_path("embedded:smollm2-135m-instruct"))
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                      tie_word_embeddings=False, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model = LlamaForCausalLM(cfg)
    digits = [tok.convert_tokens_to_ids(str(d)) for d in range(1, 10)]
    close = tok.convert_tokens_to_ids("]]")
    with torch.no_grad():
        emb, head = model.model.embed_tokens.weight, model.lm_head.weight
        emb[:, :2] = 0.0
        emb[:, 1] = 1.0                     # dim 1: "the last token was not a digit"
        emb[digits, 1] = 0.0
        emb[digits, 0] = 1.0                # dim 0: "it was a digit"
        head[:, :2] = 0.0
        head[digits, 1] = 0.5
        head[close, 0] = 0.5
    tmp = path.with_name(path.name + ".tmp")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    os.replace(tmp, path)
    return str(path)


def overrides(model: str, store: str, prompts: int, shard_size: int, steps: int, tokens: int,
              ckpt_every: int) -> list[str]:
    """The `tiny` preset shrunk to seconds: the tiny model samples, judges and is trained."""
    return [f"store.root={store}", f"policy.path={model}", f"scorer.model.path={model}",
            f"data.stage1_sft=[0,{prompts}]", f"shard_size={shard_size}",
            *(f"{s}.sampling.max_new_tokens={tokens}" for s in ("respond", "critique", "refine")),
            "scorer.max_length=512", f"rsft.step_cap={steps}", "rsft.epochs=1000",
            f"rsft.checkpoint_every={ckpt_every}",
            "rsft.lr=1e-3", "rsft.micro_batch_size=2", "rsft.max_length=256"]


def drive(cfg_path: str, prefect: bool) -> int:
    """The process chaos kills: synthesis, then RSFT on its output (every stage resumes)."""
    from omegaconf import OmegaConf

    from avr_core.config import load_config

    spec = json.loads(Path(cfg_path).read_text())
    cfg = OmegaConf.to_container(load_config("tiny", spec["overrides"]), resolve=True)
    if prefect:
        from prefect import flow

        from flows.stage1 import synthesis
        from tasks.training import train_sft

        @flow(name="avr-chaos")
        def chaos_run(cfg: dict):
            return train_sft(cfg, cfg["policy"], synthesis(cfg, cfg["policy"], "stage1_sft"))
        ref = chaos_run(cfg)
    else:   # the same task bodies without Prefect: store, shards and checkpoints only
        import tasks.synthesis as t
        from tasks.training import train_sft

        p = cfg["policy"]
        data = t.select.fn(cfg, t.rm_score.fn(cfg, t.refine.fn(cfg, p, t.critique.fn(cfg, p, t.respond.fn(
            cfg, p, t.prompts.fn(cfg, "stage1_sft"))))))
        ref = train_sft.fn(cfg, p, data)
    print(f"done {ref}", flush=True)
    return 0


# -- watching a store -----------------------------------------------------------------------------
def artifact_dir(root: Path, stage: str) -> Path | None:
    dirs = sorted(p for p in (root / stage).glob("*") if p.is_dir()) if (root / stage).is_dir() else []
    return dirs[0] if dirs else None


def done(root: Path, stage: str) -> bool:
    d = artifact_dir(root, stage)
    return d is not None and (d / "manifest.json").exists()


def phase(root: Path) -> str:
    """The stage the run is in: the first one without a manifest ('done' after the last)."""
    return next((s for s in PHASES if not done(root, s)), "done")


def markers(root: Path, stage: str) -> dict[str, str]:
    d = artifact_dir(root, stage)
    if d is None or not (d / "shards").is_dir():
        return {}
    out = {}
    for m in sorted((d / "shards").glob("*.json")):
        try:
            out[m.name] = m.read_text()
        except FileNotFoundError:
            pass
    return out


def train_dir(root: Path) -> Path | None:
    work = sorted((root / ".work").glob("rsft-*")) if (root / ".work").is_dir() else []
    return work[0] if work else None


def train_progress(root: Path) -> tuple[int, int]:
    """(optimizer steps done in the live run, step of the committed checkpoint)."""
    w = train_dir(root)
    if w is None:
        return 0, 0
    try:
        steps = sum(1 for line in (w / "ckpt" / "metrics.live.jsonl").read_text().splitlines() if line.strip())
    except FileNotFoundError:
        steps = 0
    try:
        latest = int((w / "ckpt" / "LATEST").read_text().strip().split("-")[1])
    except (FileNotFoundError, IndexError, ValueError):
        latest = 0
    return steps, latest


def progress(root: Path) -> tuple:
    """Something that changes whenever the run makes progress."""
    return phase(root), tuple(len(markers(root, s)) for s in SAMPLING), train_progress(root)[0]


def snapshot(root: Path) -> dict:
    """Where a kill landed."""
    ph = phase(root)
    steps, latest = train_progress(root)
    snap = {"phase": ph, "steps_done": steps, "ckpt_step": latest,
            "markers": {s: markers(root, s) for s in SAMPLING + ["select"]},
            "locks": sorted(p.name.split(".")[0] for p in (root / ".locks").glob("*.lock"))
            if (root / ".locks").is_dir() else [],
            "tmp_files": sum(1 for p in root.rglob("*") if ".tmp" in p.name)}
    if ph in SAMPLING + ["select", "prompts"]:
        d = artifact_dir(root, ph)
        data = sorted(p.name for p in (d / "data").glob("*.jsonl")) if d and (d / "data").is_dir() else []
        snap["shards_committed"] = len(snap["markers"].get(ph, {}))
        snap["data_files"] = len(data)
    if ph == "rsft":
        d, w = artifact_dir(root, "rsft"), train_dir(root)
        snap["exporting"] = bool(d and d.is_dir() and any(d.iterdir()))
        # a step directory newer than LATEST: the kill landed while that checkpoint was written
        ckpts = (w / "ckpt").glob("step-*") if w and (w / "ckpt").is_dir() else []
        newer = [p.name for p in ckpts if int(p.name[5:]) > latest]
        snap["ckpt_writing"] = bool(newer)
    return snap


def group_alive(pgid: int) -> list[int]:
    """Processes of a process group that are still running (zombies excluded)."""
    alive = []
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            stat = (p / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        if int(fields[2]) == pgid and fields[0] != "Z":
            alive.append(int(p.name))
    return alive


# -- running ----------------------------------------------------------------------------------------
class Driver:
    def __init__(self, workdir: Path, cfg_path: Path, prefect: bool, log: Path, api_url: str):
        self.src = workdir / "src"     # the code snapshot both runs use (see snapshot_code)
        self.cmd = [sys.executable, str(self.src / "scripts" / "chaos.py"), "drive", "--cfg", str(cfg_path)]
        if not prefect:
            self.cmd.append("--no-prefect")
        self.env = {**os.environ, **ENV, "PREFECT_HOME": str(workdir / "prefect-home"),
                    "PREFECT_API_URL": api_url, "PYTHONPATH": str(self.src)}
        self.log = log
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        f = self.log.open("a")
        f.write(f"\n===== start {time.strftime('%H:%M:%S')}\n")
        f.flush()
        self.proc = subprocess.Popen(self.cmd, cwd=self.src, env=self.env, stdout=f, stderr=subprocess.STDOUT,
                                     start_new_session=True)   # its own process group: killed whole
        f.close()

    def kill(self) -> list[int]:
        """SIGKILL the whole group; returns the pids still running a moment later (should be none)."""
        pgid = self.proc.pid
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:   # it had just exited by itself
            pass
        self.proc.wait()
        deadline = time.time() + 5
        while (alive := group_alive(pgid)) and time.time() < deadline:
            time.sleep(0.05)
        return alive


def reference(workdir: Path, cfg_path: Path, prefect: bool, api_url: str, timeout: float) -> dict:
    """The uninterrupted run: wall time and when each phase was entered (for the kill delays)."""
    root = Path(json.loads(cfg_path.read_text())["root"])
    d = Driver(workdir, cfg_path, prefect, workdir / "reference.log", api_url)
    t0 = time.time()
    d.start()
    seen, last, units = {}, None, {}
    while d.proc.poll() is None:
        if time.time() - t0 > timeout:
            d.kill()
            raise SystemExit(f"reference run took over {timeout:.0f}s; see {workdir / 'reference.log'}")
        p = progress(root)
        if p != last:
            seen.setdefault(p[0], time.time() - t0)
            units.setdefault(p[0], []).append(time.time() - t0)
            last = p
        time.sleep(0.02)
    wall = time.time() - t0
    if d.proc.returncode != 0:
        raise SystemExit(f"reference run failed ({d.proc.returncode}); see {workdir / 'reference.log'}")
    # the time one unit of work takes (a shard, an optimizer step): kill delays are drawn from it
    unit = {}
    for ph, ts in units.items():
        gaps = sorted(b - a for a, b in zip(ts, ts[1:]))
        unit[ph] = gaps[len(gaps) // 2] if gaps else 1.0
    return {"wall_s": wall, "entered": seen, "unit_s": unit}


def chaos(workdir: Path, cfg_path: Path, prefect: bool, api_url: str, kills: int, seed: int, ref: dict,
          timeout: float) -> dict:
    """Kill the run `kills` times -- the first half in the sampling stages, the rest in training --
    then let it finish."""
    rng = random.Random(seed)
    root = Path(json.loads(cfg_path.read_text())["root"])
    d = Driver(workdir, cfg_path, prefect, workdir / "chaos.log", api_url)
    targets = ["sampling"] * ((kills + 1) // 2) + ["training"] * (kills // 2)
    sampling_unit = max(ref["unit_s"].get(s, 1.0) for s in SAMPLING)
    training_unit = ref["unit_s"].get("rsft", 1.0)
    events, survivors = [], []
    t0 = time.time()
    d.start()
    last_steps = 0
    for i, target in enumerate(targets):
        # wait for NEW progress in the target's stages (a shard committed, an optimizer step beyond
        # the one the last kill interrupted), then a random delay of up to ~1.5 units of work
        group = SAMPLING if target == "sampling" else ["rsft"]
        unit = sampling_unit if target == "sampling" else training_unit
        shards0 = sum(len(markers(root, s)) for s in SAMPLING)
        while d.proc.poll() is None:
            ph = phase(root)
            if PHASES.index(ph if ph != "done" else "rsft") > PHASES.index(group[-1]) or ph == "done":
                break   # the run is past the target's stages: kill wherever it is
            if target == "sampling" and ph in SAMPLING and sum(len(markers(root, s)) for s in SAMPLING) > shards0:
                break
            if target == "training" and ph == "rsft" and train_progress(root)[0] > last_steps:
                break
            if time.time() - t0 > timeout:
                d.kill()
                raise SystemExit(f"chaos run timed out waiting for progress; see {d.log}")
            time.sleep(0.01)
        delay = rng.uniform(0, (1.5 if target == "sampling" else 1.0) * unit)
        end = time.time() + delay
        while d.proc.poll() is None and time.time() < end:
            time.sleep(0.005)
        if d.proc.poll() is not None:   # finished (or failed) before the kill: nothing left to kill
            break
        snap = snapshot(root)
        alive = d.kill()
        survivors += alive
        if snap["phase"] == "rsft":
            last_steps = max(last_steps, snap["steps_done"])
        events.append({"n": i + 1, "target": target, "t": round(time.time() - t0, 2), "delay_s": round(delay, 2),
                       **snap, "survivors": alive})
        d.start()
    try:
        d.proc.wait(timeout=max(10.0, timeout - (time.time() - t0)))
    except subprocess.TimeoutExpired:
        d.kill()
    return {"wall_s": time.time() - t0, "events": events, "rc": d.proc.returncode, "survivors": survivors}


# -- checking ---------------------------------------------------------------------------------------
def compare(ref_root: Path, chaos_root: Path, events: list[dict] | None = None) -> tuple[list[str], dict]:
    """Problems (empty: the chaos run equals the reference) and a few figures."""
    from avr_core.catalog import verify
    from avr_core.store import Store

    problems, figures = [], {}
    rs, cs = Store(str(ref_root)), Store(str(chaos_root))
    problems += [f"verify: {p}" for p in verify(cs)]
    rrefs, crefs = {str(r) for r in rs.list()}, {str(r) for r in cs.list()}
    if rrefs != crefs:
        problems.append(f"artifacts differ: only in reference {sorted(rrefs - crefs)}, "
                        f"only in chaos {sorted(crefs - rrefs)}")
    for r in sorted(rs.list(), key=lambda r: PHASES.index(r.stage) if r.stage in PHASES else 99):
        if str(r) not in crefs:
            continue
        rm, cm = rs.manifest(r), cs.manifest(r)
        if rm["rows"] != cm["rows"]:
            problems.append(f"{r}: rows {cm['rows']} != reference {rm['rows']}")
        if rm["counts"] != cm["counts"]:
            diff = {k for k in set(rm["counts"]) | set(cm["counts"]) if rm["counts"].get(k) != cm["counts"].get(k)}
            problems.append(f"{r}: counts differ in {sorted(diff)}")
        for name, n in cm["rows"].items():
            try:
                recs = cs.read_records(r, name)
            except (ValueError, UnicodeDecodeError, OSError) as e:   # OSError: IntegrityError, a checked read
                problems.append(f"{r}: {name}: unreadable records ({e})")
                continue
            ids = [x.get("id") for x in recs]
            if len(recs) != n:
                problems.append(f"{r}: {name}: {len(recs)} records, manifest says {n}")
            if len(set(ids)) != len(ids):
                problems.append(f"{r}: {name}: {len(ids) - len(set(ids))} duplicate record ids")
            figures[f"{r.stage}.{name}"] = len(recs)
        rf, cf = rm["files"], cm["files"]
        if set(rf) != set(cf):
            problems.append(f"{r}: files differ: {sorted(set(rf) ^ set(cf))}")
        for f in sorted(set(rf) & set(cf)):
            if rf[f]["sha256"] == cf[f]["sha256"]:
                continue
            if f.endswith(("train_summary.json", "metrics.jsonl")):
                continue   # timings (wall_s, step_s, tokens_per_s, resumed_from): compared below
            problems.append(f"{r}: {f} differs from the reference (sha256)")
        if r.stage == "rsft":
            problems += _compare_training(rs.local_path(r), cs.local_path(r), figures)
    problems += _leftovers(chaos_root)
    if events:
        problems += _history(chaos_root, events, figures)
    return problems, figures


def _compare_training(a: str, b: str, figures: dict) -> list[str]:
    from safetensors.numpy import load_file

    problems = []
    wa, wb = load_file(f"{a}/model/model.safetensors"), load_file(f"{b}/model/model.safetensors")
    diff = max(float(abs(wa[k].astype("float64") - wb[k].astype("float64")).max()) for k in wa)
    figures["weights_max_abs_diff"] = diff
    if diff != 0.0:
        problems.append(f"trained weights differ from the reference: max |diff| = {diff:.3g}")
    la = [json.loads(x)["loss"] for x in open(f"{a}/model/metrics.jsonl")]
    lb = [json.loads(x)["loss"] for x in open(f"{b}/model/metrics.jsonl")]
    if la != lb:
        problems.append(f"losses differ: {la} vs {lb}")
    figures["train_steps"] = len(lb)
    figures["resumed_from"] = json.loads(open(f"{b}/model/train_summary.json").read())["resumed_from"]
    return problems


def _leftovers(root: Path) -> list[str]:
    """Temporary files, lock files, half-written model directories, a checkpoint directory."""
    out = []
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root)
        if rel.parts[0] in ("runs", "leaderboard"):
            continue
        if ".tmp" in p.name or p.name.endswith(".lock") or ".old-" in p.name:
            out.append(f"leftover: {rel}")
    if (root / ".work").is_dir() and any((root / ".work").iterdir()):
        out.append(f"leftover: .work/{[p.name for p in (root / '.work').iterdir()]}")
    return out


def _history(root: Path, events: list[dict], figures: dict) -> list[str]:
    """No committed shard recomputed (its marker, with its commit time, never changes once
    written), and training never resumed from before its last committed checkpoint."""
    problems = []
    final = {s: markers(root, s) for s in SAMPLING + ["select"]}
    lost_shards = 0
    for e in events:
        for s, ms in e["markers"].items():
            for name, text in ms.items():
                if final[s].get(name) != text:
                    problems.append(f"kill {e['n']}: {s} shard {name} was committed before the kill and "
                                    "committed again after it (recomputed)")
        if e["phase"] in SAMPLING:
            lost_shards += 1   # the shard in flight, if the restarted process had reached it
    last_ckpt = 0
    for e in events:
        if e["ckpt_step"] < last_ckpt and e["phase"] == "rsft":
            problems.append(f"kill {e['n']}: committed checkpoint went back from step {last_ckpt} to {e['ckpt_step']}")
        last_ckpt = max(last_ckpt, e["ckpt_step"])
    train_kills = [e for e in events if e["phase"] == "rsft"]
    figures["steps_redone"] = sum(max(0, e["steps_done"] - e["ckpt_step"]) for e in train_kills)
    figures["shards_in_flight_lost"] = lost_shards
    if train_kills and figures.get("resumed_from") is not None:
        last = train_kills[-1]["ckpt_step"]
        if figures["resumed_from"] < last:
            problems.append(f"training resumed from step {figures['resumed_from']}, but step {last} was committed")
    return problems


# -- the command ------------------------------------------------------------------------------------
def snapshot_code(workdir: Path) -> Path:
    """Copy the code the runs execute: the reference and every restart of the chaos run must run
    the same code (a stage's cache key hashes its source), even while the tree is being edited."""
    import shutil

    src = workdir / "src"
    shutil.rmtree(src, ignore_errors=True)
    for d in ("avr_core", "tasks", "flows", "conf"):
        shutil.copytree(ROOT / d, src / d, ignore=shutil.ignore_patterns("__pycache__"))
    (src / "scripts").mkdir()
    shutil.copy2(Path(__file__).resolve(), src / "scripts" / "chaos.py")
    return src


def prefect_server(workdir: Path) -> tuple[subprocess.Popen, str]:
    """A Prefect server that outlives the killed processes, as a real deployment's does."""
    import socket

    with socket.socket() as sk:
        sk.bind(("127.0.0.1", 0))
        port = sk.getsockname()[1]
    env = {**os.environ, **ENV, "PREFECT_HOME": str(workdir / "prefect-home"), "PREFECT_UI_ENABLED": "0"}
    env.pop("PREFECT_API_URL", None)
    log = (workdir / "prefect-server.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                             "--port", str(port), "--no-ui"], env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}/api"
    import httpx

    deadline = time.time() + 180
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the Prefect server exited; see {workdir / 'prefect-server.log'}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGTERM)
    raise SystemExit("the Prefect server did not come up in 180 s")


def run(workdir: Path, kills: int, seed: int, prompts: int = 16, shard_size: int = 2, steps: int = 16,
        tokens: int = 16, ckpt_every: int = 2, prefect: bool = True, api_url: str | None = None,
        timeout: float = 1800, out=print, reuse_reference: bool = False) -> dict:
    """Reference run, chaos run, comparison. Returns the report (report["problems"] empty = pass).

    api_url: a running Prefect API for the killed processes (default: start one for the run)."""
    import shutil

    workdir.mkdir(parents=True, exist_ok=True)
    model = build_model(workdir / "model")
    if not (reuse_reference and (workdir / "src").is_dir()):
        snapshot_code(workdir)
    runs = {}
    for name in ("reference", "chaos"):
        root = workdir / name
        cfg = workdir / f"{name}.json"
        cfg.write_text(json.dumps({"root": str(root), "overrides": overrides(
            model, str(root), prompts, shard_size, steps, tokens, ckpt_every)}))
        runs[name] = cfg
    server = None
    if api_url is None:
        t = time.time()
        server, api_url = prefect_server(workdir)
        out(f"prefect server: {api_url} ({time.time() - t:.1f}s to start)")
    try:
        if reuse_reference and done(workdir / "reference", "rsft"):
            ref = json.loads((workdir / "reference.timing.json").read_text())
            out(f"reference: reused {workdir / 'reference'} ({ref['wall_s']:.1f}s when made)")
        else:
            shutil.rmtree(workdir / "reference", ignore_errors=True)
            ref = reference(workdir, runs["reference"], prefect, api_url, timeout)
            (workdir / "reference.timing.json").write_text(json.dumps(ref))
            out(f"reference: {ref['wall_s']:.1f}s uninterrupted")
        shutil.rmtree(workdir / "chaos", ignore_errors=True)
        res = chaos(workdir, runs["chaos"], prefect, api_url, kills, seed, ref, timeout)
    finally:
        if server is not None:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=30)
    problems, figures = compare(workdir / "reference", workdir / "chaos", res["events"])
    if res["rc"] != 0:
        problems.insert(0, f"the chaos run's last attempt exited {res['rc']}; see {workdir / 'chaos.log'}")
    if res["survivors"]:
        problems.append(f"processes survived a group SIGKILL: {res['survivors']}")
    if len(res["events"]) < kills:
        problems.append(f"only {len(res['events'])} of {kills} kills landed before the run finished")
    report = {"kills": len(res["events"]), "seed": seed, "reference_s": round(ref["wall_s"], 1),
              "chaos_s": round(res["wall_s"], 1), "events": res["events"], "figures": figures,
              "problems": problems}
    out(format_report(report))
    return report


def format_report(rep: dict) -> str:
    lines = [f"{'#':>3} {'target':9} {'t_s':>6}  landed in", "-" * 60]
    for e in rep["events"]:
        if e["phase"] in SAMPLING + ["select", "prompts"]:
            where = f"{e['phase']}: {e['shards_committed']} shards committed, {e['data_files']} data files"
        elif e["phase"] == "rsft":
            where = (f"rsft: {e['steps_done']} steps done, committed checkpoint: step {e['ckpt_step']}"
                     + (", inside a checkpoint write" if e.get("ckpt_writing") else "")
                     + (", model export started" if e.get("exporting") else ""))
        else:
            where = e["phase"]
        if e["locks"]:
            where += f"; lock held: {','.join(e['locks'])}"
        if e["tmp_files"]:
            where += f"; {e['tmp_files']} temporary file(s)"
        lines.append(f"{e['n']:>3} {e['target']:9} {e['t']:>6}  {where}")
    f = rep["figures"]
    by_phase: dict[str, int] = {}
    for e in rep["events"]:
        by_phase[e["phase"]] = by_phase.get(e["phase"], 0) + 1
    lines += ["-" * 60,
              f"kills: {rep['kills']} ({', '.join(f'{k} {v}' for k, v in by_phase.items())}), seed {rep['seed']}",
              f"records: {', '.join(f'{k}={v}' for k, v in f.items() if '.' in k)}",
              f"shards in flight lost (redone): <= {f.get('shards_in_flight_lost')}, committed shards redone: "
              f"{'none' if not any('recomputed' in p for p in rep['problems']) else 'SOME'}",
              f"kills with a stage lock held: {sum(bool(e['locks']) for e in rep['events'])} (each restart "
              "took the lock over), with temporary files present: "
              f"{sum(bool(e['tmp_files']) for e in rep['events'])}",
              f"training steps redone: {f.get('steps_redone')}, final resume from step {f.get('resumed_from')} "
              f"of {f.get('train_steps')}, weights max |diff| vs reference: {f.get('weights_max_abs_diff')}",
              f"wall: reference {rep['reference_s']}s, chaos {rep['chaos_s']}s "
              f"({rep['chaos_s'] / max(rep['reference_s'], 1e-9):.2f}x)",
              "identical to the reference: " + ("YES" if not rep["problems"] else "NO")]
    lines += [f"PROBLEM: {p}" for p in rep["problems"]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd")
    dr = sub.add_parser("drive", help="(internal) the process that gets killed")
    dr.add_argument("--cfg", required=True)
    dr.add_argument("--no-prefect", action="store_true")
    p.add_argument("--kills", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--store", default="/tmp/avr-chaos", help="work directory: reference/ and chaos/ stores")
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--shard-size", type=int, default=2)
    p.add_argument("--steps", type=int, default=16, help="RSFT optimizer steps")
    p.add_argument("--ckpt-every", type=int, default=2, help="RSFT checkpoint every N steps")
    p.add_argument("--tokens", type=int, default=16, help="max new tokens per sample")
    p.add_argument("--no-prefect", action="store_true", help="call the task bodies directly, not as a flow")
    p.add_argument("--api-url", help="a running Prefect API (default: start a server for the run)")
    p.add_argument("--reuse-reference", action="store_true", help="keep a finished reference run of the same code")
    p.add_argument("--json", help="also write the report here")
    a = p.parse_args(argv)
    if a.cmd == "drive":
        return drive(a.cfg, not a.no_prefect)
    rep = run(Path(a.store), a.kills, a.seed, a.prompts, a.shard_size, a.steps, a.tokens, a.ckpt_every,
              not a.no_prefect, a.api_url, reuse_reference=a.reuse_reference)
    if a.json:
        Path(a.json).write_text(json.dumps(rep, indent=1))
    return 1 if rep["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
