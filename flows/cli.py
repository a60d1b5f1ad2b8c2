"""`avr` -- the command line.

    avr run --preset tiny [--store-root DIR --iterations N ...] [key=value ...]   the whole pipeline
    avr config --preset paper [key=value ...] print the resolved, validated config
    avr chat --model DIR [--rounds R | --thought] "prompt"   try a trained model
    avr eval [--store PATH] [--model NAME] [--last N]        the leaderboard, read from the store
    avr artifacts list|show KEY|lineage KEY|verify [KEY]     read manifests directly (no server)
    avr compare [RUN_A] RUN_B [--store PATH]                 two runs stage by stage (A: B's previous run)
    avr resume RUN_ID [--store PATH]                         run a failed run again: done stages from cache
    avr server [--host 127.0.0.1] [--port 4200]              a Prefect server + UI, telemetry off
    avr deploy --preset paper --pool avr-gpu [key=value ...] the deployments on a work pool (docker/)
    avr serve --preset tiny [key=value ...]                  deployments for the UI + the nightly schedule
"""
from __future__ import annotations

import argparse
import logging
import os
import sys


def _env_defaults() -> None:
    # No internet on many research clusters: keep Prefect from phoning home. The hub is NOT forced
    # offline here: that is the user's choice (HF_HUB_OFFLINE, or the preset's hub.offline:
    # avr_core/hub.py), so an online machine downloads what the paper preset names.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # Prefect waits 20 s for `avr run`'s temporary API server: on a loaded 2-core machine it
    # started later than that and the run failed before its first stage (seen 2026-12-03)
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")


def main(argv: list[str] | None = None) -> int:
    try:
        code = _main(argv)
        sys.stdout.flush()          # inside the try: a closed pipe shows up at this flush
        return code
    except BrokenPipeError:         # `avr ... | head` stopped reading: not an error worth a traceback
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())   # so the exit's own flush is quiet
        return 141                  # 128 + SIGPIPE, what a shell tool reports


def _main(argv: list[str] | None = None) -> int:
    _env_defaults()
    from avr_core.redact import install
    install()   # no key value in any log line from here on
    # alpaca-eval raises the root logger to INFO on import; keep httpx's per-request lines out of a run's log
    logging.getLogger("httpx").setLevel(logging.WARNING)
    p = argparse.ArgumentParser(prog="avr", description="AvR: Alignment via Refinement pipeline")
    sub = p.add_subparsers(dest="cmd", required=True)
    for name, help_ in [("run", "run the whole pipeline"), ("config", "print the resolved config"),
                        ("serve", "register the pipeline and stage deployments (UI, nightly cron) and serve them"),
                        ("deploy", "register the deployments on a work pool for workers (docker/compose.yaml)")]:
        s = sub.add_parser(name, help=help_)
        s.add_argument("--preset", default="tiny", help=f"a shipped preset ({', '.join(_presets())}) "
                       "or a YAML path (default: %(default)s)")
        s.add_argument("overrides", nargs="*", help="key=value overrides, e.g. critique.k=3")
        _param_flags(s)
        if name == "deploy":
            s.add_argument("--pool", default="avr-gpu", help="the work pool the workers pull from "
                                                             "(default: %(default)s)")
    c = sub.add_parser("chat", help="answer a prompt with a model (Stage-1: R refinement rounds; Stage-2: a thought)")
    c.add_argument("prompt", nargs="?", help="the prompt (default: read lines from stdin)")
    c.add_argument("--model", default="embedded:smollm2-135m-instruct",
                   help="model directory (a trained one: <store>/po/<key>/model for Stage 1, "
                        "<store>/cot_po/<key>/model for Stage 2) or embedded:NAME "
                        "(default: %(default)s, the untrained seed)")
    c.add_argument("--rounds", type=int, default=0, help="critique/refine rounds for a Stage-1 model, "
                                                         "0..5 (default: %(default)s)")
    c.add_argument("--thought", action="store_true", help="Stage-2 model: one long thought, final answer "
                                                          "extracted (default: off)")
    c.add_argument("--max-new-tokens", type=int, default=512, help="tokens per generation, for each answer, "
                                                                   "critique and refinement (default: %(default)s)")
    c.add_argument("--show-trace", action="store_true", help="print the first answer, each round's critique "
                                                             "and refinement (or the thought), then the final "
                                                             "answer, each labelled (default: off)")
    e = sub.add_parser("eval", help="show the leaderboard every run appends to (no server needed)")
    e.add_argument("--store", default=None, help="artifact store (default: AVR_STORE or ./artifacts)")
    e.add_argument("--model", default=None, help="only this model: seed, rsft, stage1 or stage2 "
                                                 "(default: every model)")
    e.add_argument("--last", type=_non_negative, default=0, help="only the last N rows (default: 0 = all)")
    e.add_argument("--csv", action="store_true", help="print CSV instead of markdown (default: off)")
    rs = sub.add_parser("resume", help="run a failed or stopped run again: finished stages are cache hits",
                        description=RESUME_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    rs.add_argument("run", metavar="RUN_ID", help="the run id `avr run` printed (e.g. 20261203-080303-fe9764; a "
                                                  "unique prefix works), or a Prefect flow-run UUID")
    rs.add_argument("--store", default=None, help="the run's artifact store (default: AVR_STORE or ./artifacts)")
    sv = sub.add_parser("server", help="start a Prefect server and its UI (127.0.0.1 unless --host)")
    sv.add_argument("--host", default=os.environ.get("AVR_SERVER_HOST", "127.0.0.1"),
                    help="address to listen on (default: AVR_SERVER_HOST or 127.0.0.1, here %(default)s)")
    sv.add_argument("--port", type=int, default=4200, help="port of the UI and its API (default: %(default)s)")
    a = sub.add_parser("artifacts", help="list / show / lineage / verify artifacts from their manifests")
    a.add_argument("action", choices=["list", "show", "lineage", "verify"])
    a.add_argument("key", nargs="?", help="stage/key or a unique key prefix (show, lineage; optional for verify)")
    a.add_argument("--store", default=None, help="artifact store (default: AVR_STORE or ./artifacts)")
    a.add_argument("--stage", default=None, help="list: only this stage, e.g. po or cot_po (default: all)")
    cp = sub.add_parser("compare", help="compare two runs: per stage computed/cached, counts, metrics, leaderboard")
    cp.add_argument("runs", nargs="+", metavar="RUN", help="RUN_A RUN_B (ids or unique prefixes), or RUN_B alone: "
                                                           "against the previous run of its deployment")
    cp.add_argument("--store", default=None, help="artifact store (default: AVR_STORE or ./artifacts)")
    args = p.parse_args(argv)
    if args.cmd == "compare":
        return _compare(args)
    if args.cmd == "artifacts":
        return _artifacts(args)
    if args.cmd == "resume":
        from flows import supervisor
        if not supervisor.is_worker():   # stops promptly on SIGTERM / Ctrl-C, as `avr run` does
            return supervisor.supervise(sys.argv[1:] if argv is None else list(argv))
        from flows.resume import resumer
        try:
            again, run_id = resumer(args.run, args.store)
        except ValueError as e:
            print(f"avr: error: {e}", file=sys.stderr)
            return 2
        with supervisor.worker():
            return _run_flow(again, sys.argv[1:] if argv is None else list(argv), run_id)
    if args.cmd == "server":
        print(f"Prefect UI: http://{args.host}:{args.port}  -- in another shell: "
              f"export PREFECT_API_URL=http://{args.host}:{args.port}/api", flush=True)
        # the UI's own API address follows these settings, not the --host/--port flags (without them,
        # a server on another port serves a UI that calls 127.0.0.1:4200)
        os.environ["PREFECT_SERVER_API_HOST"], os.environ["PREFECT_SERVER_API_PORT"] = args.host, str(args.port)
        os.execv(sys.executable, [sys.executable, "-m", "prefect", "server", "start", "--host", args.host,
                                  "--port", str(args.port)])
    if args.cmd == "chat":
        return _chat(args)
    if args.cmd == "eval":
        return _eval(args)

    from pydantic import ValidationError

    from avr_core.config import ConfigError, load_config, to_yaml
    from avr_core.inputs import InputError
    from flows.params import RunParams
    try:
        params = RunParams(preset=args.preset, overrides=list(args.overrides),
                           **{f: getattr(args, f) for f in PARAM_FLAGS if getattr(args, f) is not None})
        overrides = params.to_overrides()
        if args.cmd == "config":
            print(to_yaml(load_config(params.preset, overrides)), end="")
            return 0
        if args.cmd in ("serve", "deploy"):
            if problem := _no_api_server(args.cmd):
                print(f"avr: error: {problem}", file=sys.stderr)
                return 2
            _apply_hub_mode(params.preset, overrides)   # the served runs inherit this process's hub mode
        if args.cmd == "serve":
            from flows.deploy import serve
            serve(params.preset, overrides)
            return 0
        if args.cmd == "deploy":
            from flows.deploy import deploy_to_pool
            ids = deploy_to_pool(params.preset, overrides, args.pool)
            print(f"registered {len(ids)} deployments on work pool {args.pool!r}")
            return 0
        # fail fast on bad config or prompts, before Prefect starts a server or anything is written
        from omegaconf import OmegaConf

        from flows.runs import preflight
        cfg = load_config(params.preset, overrides)
        _apply_hub_mode(params.preset, overrides, cfg)   # before preflight reads a hub dataset
        preflight(OmegaConf.to_container(cfg, resolve=True))
        # The run goes on in a worker process that SIGTERM or Ctrl-C stops in seconds, leaving
        # nothing behind; this process waits for it (flows/supervisor.py says why).
        from flows import supervisor
        if not supervisor.is_worker():
            return supervisor.supervise(sys.argv[1:] if argv is None else list(argv))
        if cfg.flow == "signal":           # stage 1 + learning signal + test-time scaling (conf/signal.yaml)
            from flows.learning_signal import signal_run as flow
        else:
            from flows.pipeline import pipeline as flow
        with supervisor.worker():
            return _run_flow(lambda: flow(params=params), sys.argv[1:] if argv is None else list(argv))
    except ValidationError as e:
        print(f"avr: error: {validation_message(e)}", file=sys.stderr)
        return 2
    except (ConfigError, InputError) as e:
        print(f"avr: error: {e}", file=sys.stderr)
        return 2


def _presets() -> list[str]:
    from avr_core.config import CONF_DIR
    return sorted(p.stem for p in CONF_DIR.glob("*.yaml"))


def _non_negative(text: str) -> int:
    n = int(text)
    if n < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {n}")
    return n


def _apply_hub_mode(preset: str, overrides: list[str], cfg=None) -> None:
    """The config's hub.offline as HF_HUB_OFFLINE, before any HF library is imported (avr_core/hub.py)."""
    from avr_core.config import load_config
    from avr_core.hub import apply_mode
    apply_mode(bool((cfg or load_config(preset, overrides)).hub.offline))


def _no_api_server(cmd: str) -> str | None:
    """Why `avr serve` / `avr deploy` must not go on: without PREFECT_API_URL (env or profile), Prefect
    would start a temporary server for them; nothing else sees its deployments, no schedule of it
    ever fires, and it shares ~/.prefect/prefect.db with `avr server`, so its shutdown paused the
    real server's deployments (seen 2026-12-03). Refusing removes that case."""
    from prefect.settings import get_current_settings
    if get_current_settings().api.url:
        return None
    return (f"avr {cmd} needs a running Prefect server, else its deployments land on a temporary one "
            "that nothing sees: start `avr server`, then export PREFECT_API_URL=http://127.0.0.1:4200/api")


RESUME_HELP = """\
Runs a failed or stopped run again; what it had finished is not recomputed.

By run id (printed by `avr run` at its start and in its failure line): the run's flow runs again
with the run's own config, runs/<id>/config.yaml, against the same store. No Prefect server is
needed (the temporary one of `avr run` may be gone). Every stage whose artifact is in the store
is a cache hit; the stage that failed and everything after it are computed; a half-finished
sampling stage continues from its last committed shard. The new run gets its own id, and its
runs/<id>/run.json names the run it resumes.

By Prefect flow-run UUID: the parameters are read from the Prefect API that ran it
(PREFECT_API_URL), then the same happens.
"""


def _run_flow(call, argv: list[str], resumes: str | None = None) -> int:
    """Run a flow in this (the worker) process. A failure ends with one line: the stage, the
    error, what is kept and the resume command; its traceback is in the log above, once."""
    from flows.runs import failure_line, launched

    with launched(argv, resumes):
        try:
            call()
        except Exception as e:
            line = failure_line(e)
            if line is None:       # it failed before the run started: nothing to resume
                raise
            print(line, file=sys.stderr, flush=True)
            return 1
    return 0


# the form's fields (flows/params.py RunParams) as flags of run / config / serve / deploy
PARAM_FLAGS = ("prompts", "policy", "store_root", "iterations", "iterate_model", "continue_from")


def _param_flags(s) -> None:
    from typing import get_args

    from flows.params import RunParams

    for name in PARAM_FLAGS:
        f = RunParams.model_fields[name]
        kw = {"choices": list(get_args(f.annotation))} if get_args(f.annotation) else {}
        s.add_argument(f"--{name.replace('_', '-')}", dest=name, default=None, type=f.annotation if
                       f.annotation is int else str, help=f.description.replace("%", "%%"), **kw)


def validation_message(e) -> str:
    """One line from a pydantic ValidationError of RunParams: the field and what is wrong."""
    err = e.errors()[0]
    msg = err["msg"].removeprefix("Value error, ")
    return msg if msg.startswith("field '") or not err["loc"] else f"field '{err['loc'][0]}': {msg}"


def _compare(args) -> int:
    from avr_core import compare
    from avr_core.store import Store

    store = Store(args.store or os.environ.get("AVR_STORE") or "./artifacts")
    if len(args.runs) > 2:
        print("avr: error: `avr compare` takes RUN_A RUN_B, or RUN_B alone", file=sys.stderr)
        return 2
    try:
        ids = [compare.resolve_run(store, r) for r in args.runs]
        if len(ids) == 1:
            prev = compare.previous_run(store, compare.load_run(store, ids[0]))
            if prev is None:
                raise ValueError(f"run {ids[0]} has no earlier run of the same deployment in {store.root}")
            ids.insert(0, prev)
    except ValueError as e:
        print(f"avr: error: {e}", file=sys.stderr)
        return 2
    print(compare.to_markdown(compare.compare(store, ids[0], ids[1])), end="")
    return 0


def _artifacts(args) -> int:
    import json

    from avr_core import catalog
    from avr_core.store import Store

    store = Store(args.store or os.environ.get("AVR_STORE") or "./artifacts")
    try:
        _check_store(store, args.stage)
        ref = catalog.resolve(store, args.key) if args.key else None
        if args.action in ("show", "lineage") and ref is None:
            raise ValueError(f"`avr artifacts {args.action}` needs a KEY")
    except ValueError as e:
        print(f"avr: error: {e}", file=sys.stderr)
        return 2
    if args.action == "list":
        for r in catalog.list_rows(store, args.stage):
            print(f"{r['artifact']:40} {r['created']}  rows={r['rows']}  inputs={r['inputs']}")
    elif args.action == "show":
        print(json.dumps(store.manifest(ref), indent=2))
    elif args.action == "lineage":
        print("\n".join(catalog.lineage(store, ref)))
    else:
        problems = catalog.verify(store, ref)
        for line in problems:
            print(line)
        n = 1 if ref else len(store.list())
        print(f"verified {n} artifact(s): {'OK' if not problems else f'{len(problems)} problem(s)'}",
              file=sys.stderr)
        return 1 if problems else 0
    return 0


def _check_store(store, stage: str | None) -> None:
    """An empty listing must not hide a wrong --store or --stage: say which, and what exists."""
    if not store.fs.isdir(store.path()):
        raise ValueError(f"no artifact store at {store.root} (--store, or AVR_STORE; default ./artifacts)")
    stages = sorted({r.stage for r in store.list()}) if stage else []
    if stage and stage not in stages:
        raise ValueError(f"no stage {stage!r} in {store.root}; its stages: {', '.join(stages) or 'none yet'}")


def _eval(args) -> int:
    from avr_core.evaluation import leaderboard as lb
    from avr_core.store import Store

    root = args.store or os.environ.get("AVR_STORE") or "./artifacts"
    try:
        rows = lb.read(Store(root))
    except ValueError as e:   # a damaged row file or legacy leaderboard.csv: the file, its line/row and field
        print(f"avr: error: {e}", file=sys.stderr)
        return 2
    models = sorted({r["model"] for r in rows})
    if args.model and rows and args.model not in models:
        print(f"avr: error: no rows of model {args.model!r} in {root}; its models: {', '.join(models)}",
              file=sys.stderr)
        return 2
    if args.model:
        rows = [r for r in rows if r["model"] == args.model]
    if args.last:
        rows = rows[-args.last:]
    if not rows:
        print(f"avr: no leaderboard rows in {root} (run `avr run` first)", file=sys.stderr)
        return 1
    banner = None if args.csv else _smoke_banner(root, rows)
    print(lb.to_csv(rows) if args.csv else lb.to_markdown(rows, banner), end="")
    return 0


def _smoke_banner(root: str, rows: list[dict]) -> str | None:
    """leaderboard.md's rule, per row: a row from a run whose config has eval.smoke (tiny) is a smoke
    result. A run whose config.yaml is gone counts as smoke when leaderboard.md carries the banner."""
    from omegaconf import OmegaConf

    from avr_core.store import Store
    from tasks.evaluate import SMOKE_TITLE

    store = Store(root)
    md = store.path("leaderboard", "leaderboard.md")
    md_smoke = store.fs.exists(md) and store.fs.cat_file(md).decode().startswith("SMOKE RUN")

    def smoke(run: str) -> bool:
        path = store.path("runs", run, "config.yaml")
        if not store.fs.exists(path):
            return md_smoke
        return bool(OmegaConf.select(OmegaConf.create(store.fs.cat_file(path).decode()), "eval.smoke"))
    runs = {r["run"]: smoke(r["run"]) for r in rows}
    if not any(runs.values()):
        return None
    if all(runs.values()):
        return SMOKE_TITLE
    return f"{SMOKE_TITLE}\n\nsmoke rows: runs {', '.join(r for r, yes in runs.items() if yes)}"


def _chat(args) -> int:
    # tqdm reads TQDM_DISABLE when first imported (below): no progress bar runs into the answer or trace
    os.environ.setdefault("TQDM_DISABLE", "1")
    from avr_core.model_refs import model_ref_problem

    if problem := model_ref_problem(args.model):   # before loading anything
        print(f"avr: error: --model {args.model}: {problem}", file=sys.stderr)
        return 2
    from avr_core.backends.base import SamplingParams
    from avr_core.backends.hf import HFGenerator
    from avr_core.inference import answer_prompts
    from avr_core.model_refs import resolve_model_path

    if not 0 <= args.rounds <= 5:
        print("avr: error: --rounds must be in 0..5", file=sys.stderr)
        return 2
    try:
        gen = HFGenerator(resolve_model_path(args.model))
    except OSError as e:   # e.g. a hub id that is not in the local cache (HF_HUB_OFFLINE)
        from avr_core.hub import mode_line
        print(f"avr: error: --model {args.model}: cannot load: {str(e).splitlines()[0]}; {mode_line()}",
              file=sys.stderr)
        return 2
    prompts = [args.prompt] if args.prompt else [line.strip() for line in sys.stdin if line.strip()]
    params = SamplingParams(n=1, temperature=0.0, max_new_tokens=args.max_new_tokens)
    convs = [[{"role": "user", "content": q}] for q in prompts]
    for out in answer_prompts(convs, gen, "thought" if args.thought else "refine", args.rounds, params):
        print(trace_text(out, args.thought) if args.show_trace else out["answer"])
    return 0


def trace_text(out: dict, thought: bool) -> str:
    """One answer of `answer_prompts` with its steps, each labelled: the first answer, every round's
    critique and refinement (or the Stage-2 thought), then the final answer and where it came from."""
    if thought:
        parts = [("thought", out["raw"])]
    else:
        parts = [("first answer", out["answers"][0])]
        for i, step in enumerate(out["trace"], 1):
            parts += [(f"round {i} critique", step["critique"]), (f"round {i} refinement", step["refinement"])]
    parts.append((f"final answer ({out['path']})", out["answer"]))
    return "\n".join(f"--- {label} ---\n{text}" for label, text in parts)


if __name__ == "__main__":
    sys.exit(main())
