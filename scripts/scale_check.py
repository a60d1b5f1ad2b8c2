"""Issue 15's end-to-end check on this machine (scripts/scale_check.sh runs it; <= 10 min on 2 cores).

1. Scale-out (item 2): tests/system/flows/test_scale_out.py -- the real `respond` stage, 8 shards, on a
   local Ray cluster with 2 worker processes: shards on both workers, the artifact byte-identical
   to the sequential run's, a worker killed mid-shard costs that shard once.
2. The store on S3 (item 3): moto's S3 server on 127.0.0.1; TWO processes start the same stage-1
   synthesis + RSFT training + a respond by the trained model (fetched from the store into the local
   cache), with a tiny random Llama (tests/tiny_models.py) as the policy (synthesis scripted:
   tests/fakes.py), on
   `store.root=s3://...` at once: every artifact is computed by exactly one of them; a third process
   reruns it: a full cache hit; `avr artifacts verify` on the bucket passes.

Prints `scale-out ok: <shards per worker>, <s3 cache-hit rerun>` and exits 0, or exits 1 naming
what failed.

    .venv/bin/python scripts/scale_check.py            # both
    .venv/bin/python scripts/scale_check.py --only s3  # or --only ray
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SMALL = ["data.stage1_sft=[0,3]", "shard_size=3", "critique.max_tries=1", "respond.sampling.max_new_tokens=16",
         "critique.sampling.max_new_tokens=16", "refine.sampling.max_new_tokens=16", "scorer.max_length=512",
         "rsft.step_cap=1", "rsft.micro_batch_size=1", "rsft.checkpoint_every=1", "data.heldout=[40,42]"]


def child(root: str, model: str) -> None:
    """One process of the S3 check: synthesis -> train_sft -> respond with the trained model.
    `model`: the tiny random Llama (tests/tiny_models.py) as policy and scorer."""
    from omegaconf import OmegaConf
    from prefect import flow

    import tasks.synthesis as t
    import tasks.training as tr
    from avr_core.config import load_config
    from flows.stage1 import synthesis
    from tasks.runtime.ledger import STAGE_LOG
    from tests.fakes import FakeGenerator, FakeScorer

    # Synthesis by the scripted generator and scorer of the flow tests (tests/fakes.py): a tiny
    # RANDOM model never writes a parsable rating, so its synthesis would select nothing to train on.
    # What the check is about stays real: the lease race on every stage, DeepSpeed training of the
    # tiny Llama with its model uploaded into the store, and the trained model's `respond` by the
    # real HF generator from the copy fetched into the local cache.
    real = t.make_generator
    t.make_generator = lambda policy, backend: (real(policy, backend) if policy.get("artifact") else FakeGenerator(
        critiques=["Needs work. Rating: [[4]]", "Fine. Rating: [[7]]"]))
    t.make_scorer = lambda c: FakeScorer()

    # a plain dict, as the flows pass it (the training spec is JSON)
    over = [f"store.root={root}", "store.lease_s=20", *SMALL, f"policy.path={model}", f"scorer.model.path={model}"]
    cfg = OmegaConf.to_container(load_config("tiny", over), resolve=True)

    @flow(name="scale-check-s3")
    def run():
        seed = dict(cfg["policy"])
        data = synthesis(cfg, seed, "stage1_sft")
        model = tr.train_sft(cfg, seed, data)
        answers = t.respond(cfg, tr.policy_of(cfg, model), t.prompts(cfg, "heldout"))
        return {"model": str(model), "answers": str(answers)}

    t0 = time.time()
    refs = run()
    print("RESULT " + json.dumps({"refs": refs, "stages": STAGE_LOG, "pid": os.getpid(),
                                  "wall_s": round(time.time() - t0, 1)}), flush=True)


def _spawn(root: str, model: str, env: dict, log: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, __file__, "child", root, model], cwd=ROOT, stdout=open(log, "w"),
                            stderr=subprocess.STDOUT, env=env)


def _result(p: subprocess.Popen, log: Path, timeout: float) -> dict:
    rc = p.wait(timeout)
    text = log.read_text()
    if rc != 0 or "RESULT " not in text:
        raise RuntimeError(f"process {p.pid} exited {rc}: ...{text[-3000:]}")
    return json.loads(text.split("RESULT ", 1)[1].splitlines()[0])


def check_s3(work: Path) -> str:
    sys.path.insert(0, str(ROOT))
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    from tests.s3server import BUCKET, moto_s3
    from tests.tiny_models import tiny_llama

    # the tiny random Llama as policy and scorer: the check is about the mechanism, and every file
    # (the trained model included) stays a single PUT (a 540 MB SmolLM2 goes multipart: see
    # docs/RELIABILITY.md "Object stores" for moto's multipart limits)
    model = tiny_llama(str(work / "tiny-llama"))

    # ONE Prefect API for the three processes (a throwaway database), as the tests do
    with moto_s3() as s3env, prefect_test_harness(server_startup_timeout=240):
        root = f"s3://{BUCKET}/scale-check"
        env = {**os.environ, **s3env, "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "OMP_NUM_THREADS": "1",
               "AVR_CACHE_DIR": str(work / "cache"), "AVR_RETRY_DELAY_S": "0",
               "PREFECT_API_URL": PREFECT_API_URL.value(),
               "PREFECT_RESULTS_LOCAL_STORAGE_PATH": str(work / "prefect-results"),
               "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
        t0 = time.time()
        a, b = _spawn(root, model, env, work / "a.log"), _spawn(root, model, env, work / "b.log")
        ra, rb = _result(a, work / "a.log", 540), _result(b, work / "b.log", 540)
        race_s = time.time() - t0
        if ra["refs"] != rb["refs"]:
            raise AssertionError(f"the racing processes returned different artifacts: {ra['refs']} vs {rb['refs']}")
        computed = {}
        for r in (ra, rb):
            for s in r["stages"]:
                if not s["cached"]:
                    computed.setdefault(s["artifact"], []).append(r["pid"])
        twice = {k: v for k, v in computed.items() if len(v) > 1}
        if twice:
            raise AssertionError(f"computed by both racing processes: {twice}")
        arts = {s["artifact"] for s in ra["stages"]}
        if set(computed) != arts:
            raise AssertionError(f"not computed by either process: {sorted(arts - set(computed))}")
        t1 = time.time()
        c = _spawn(root, model, env, work / "c.log")
        rc = _result(c, work / "c.log", 300)
        rerun_s = time.time() - t1
        hits = sum(s["cached"] for s in rc["stages"])
        if hits != len(rc["stages"]) or rc["refs"] != ra["refs"]:
            raise AssertionError(f"rerun: {hits} of {len(rc['stages'])} stages cached; refs {rc['refs']}")
        v = subprocess.run([sys.executable, "-m", "avr_cli", "artifacts", "verify", "--store", root], cwd=ROOT,
                           env=env, capture_output=True, text=True, timeout=120)
        if v.returncode != 0:
            raise AssertionError(f"avr artifacts verify on {root}: {v.stdout}{v.stderr}")
        split = {r["pid"]: sum(1 for s in r["stages"] if not s["cached"]) for r in (ra, rb)}
        print(f"s3: race of 2 processes {race_s:.0f} s, {len(arts)} artifacts each computed once "
              f"(per process {sorted(split.values(), reverse=True)}); rerun {rerun_s:.0f} s, "
              f"{hits}/{len(rc['stages'])} cached; verify: {v.stderr.strip()}", flush=True)
        return f"s3 rerun {hits}/{len(rc['stages'])} stages cached"


def check_ray(work: Path) -> str:
    report = work / "ray.json"
    env = {**os.environ, "AVR_SCALE_REPORT": str(report), "OMP_NUM_THREADS": "1"}
    test = "tests/system/flows/test_scale_out.py"
    p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "", test],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=420)
    if p.returncode != 0:
        raise AssertionError(f"tests/system/flows/test_scale_out.py failed:\n{p.stdout[-4000:]}")
    r = json.loads(report.read_text())
    print(f"ray: 8 shards on 2 workers {r['shards_per_worker']}, byte-identical to the sequential run; "
          f"killed worker's shard started {r['killed_shard_starts']}x, every other shard once", flush=True)
    return f"shards per worker {'+'.join(map(str, r['shards_per_worker']))}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", choices=["ray", "s3"], default=None)
    args = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="avr-scale-check-"))
    parts, t0 = [], time.time()
    for name, fn in (("ray", check_ray), ("s3", check_s3)):
        if args.only in (None, name):
            try:
                parts.append(fn(work))
            except Exception as e:
                print(f"scale-out FAILED: {name}: {e}", file=sys.stderr, flush=True)
                print(f"(logs in {work})", file=sys.stderr)
                return 1
    print(f"({time.time() - t0:.0f} s; logs in {work})")
    print(f"scale-out ok: {', '.join(parts)}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 3 and sys.argv[1] == "child":
        child(sys.argv[2], sys.argv[3])
        sys.exit(0)
    sys.exit(main())
