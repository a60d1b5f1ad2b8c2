"""Inspect an artifact store from its manifests alone -- no Prefect server needed.

    avr artifacts list [--stage po]          every artifact: stage/key, created, rows
    avr artifacts show po/86a7...            its manifest
    avr artifacts lineage po/86a7...         what it was made from, down to the prompt files
    avr artifacts verify                     every file against the sha256 in its manifest, every
                                             manifest against its own; the whole store: leftovers too

A key may be written `stage/key` or as a unique prefix of the key alone. A damaged manifest is one
line naming its file wherever it is read here, never a traceback.
"""
from __future__ import annotations

import logging

from avr_core.store import ATTEMPTS, MANIFEST, ArtifactRef, IntegrityError, Store, file_digest
from avr_core.store.manifests import sealed
from avr_core.store.objects import files_under, pending_uploads

log = logging.getLogger("avr")


def resolve(store: Store, key: str) -> ArtifactRef:
    """`stage/key`, or a unique key prefix -> a reference; ValueError naming the problem."""
    stage, _, k = key.rpartition("/")
    cands = [r for r in store.list(stage or None) if r.key.startswith(k)]
    if len(cands) != 1:
        raise ValueError(f"{key!r}: {'no artifact' if not cands else f'{len(cands)} artifacts'} match in {store.root}")
    return cands[0]


def list_rows(store: Store, stage: str | None = None) -> list[dict]:
    rows = []
    for r in store.list(stage):
        try:
            m = store.manifest(r)
        except IntegrityError:
            m = {"rows": "DAMAGED manifest (avr artifacts verify)"}
        rows.append({"artifact": str(r), "created": m.get("created"), "rows": m.get("rows"),
                     "inputs": len(m.get("inputs", []))})
    return sorted(rows, key=lambda x: x["created"] or "")


def _parents(store: Store, ref: ArtifactRef) -> list[str]:
    """Input artifacts, plus the model a stage ran (a trained policy is named by its artifact key)."""
    m = store.manifest(ref)
    out = list(m.get("inputs", []))
    cfg = m.get("config") or {}
    for section in ("policy", "reference"):
        art = cfg.get(section, {}).get("artifact") if isinstance(cfg.get(section), dict) else None
        if art and art not in out:
            out.append(art)
    return out


def lineage(store: Store, ref: ArtifactRef, depth: int = 0, seen: set | None = None) -> list[str]:
    """Indented lines: the artifact, then recursively what it was made from. Prompt artifacts
    show the file checksum and slice that made them; a model its base policy path."""
    seen = set() if seen is None else seen
    try:
        m = store.manifest(ref)
    except IntegrityError as e:
        return [f"{'  ' * depth}{ref}  DAMAGED: {e}"]
    cfg = m.get("config") or {}
    note = ""
    if ref.stage in ("prompts", "eval_prompts"):
        note = f"  file_sha256={cfg.get('file_sha256')} slice={cfg.get('slice')} split={cfg.get('split', '')}"
    elif isinstance(cfg.get("policy"), dict) and "artifact" not in cfg["policy"]:
        note = f"  policy={cfg['policy'].get('path')}"
    lines = [f"{'  ' * depth}{ref}  ({m.get('created')}){note}"]
    if str(ref) in seen:
        return [lines[0] + "  [see above]"]
    seen.add(str(ref))
    for parent in _parents(store, ref):
        stage, _, key = parent.partition("/")
        pref = store.ref(stage, key)
        missing = [f"{'  ' * (depth + 1)}{parent}  MISSING"]
        lines += lineage(store, pref, depth + 1, seen) if store.exists(pref) else missing
    return lines


def verify(store: Store, ref: ArtifactRef | None = None) -> list[str]:
    """Problems found (empty = all good): a manifest that does not parse or does not match its own
    digest, a file missing, truncated or modified against its manifest. The whole store (no `ref`)
    also: a stage directory with data but no manifest (an unfinished or damaged artifact), and what
    is left behind and still stored (`leftovers`). A manifest written before manifests carried
    their digest is read as before and counted in one log line, not a problem."""
    problems, unsealed = [], []
    refs = [ref] if ref else store.list()
    for r in refs:
        try:
            m = store.manifest(r)
        except IntegrityError as e:
            problems.append(str(e))
            continue
        if not sealed(m):
            unsealed.append(str(r))
        for rel, meta in m["files"].items():
            path = store.object_path(r, rel, m)
            if not store.fs.exists(path):
                problems.append(f"{r}: {rel}: missing")
                continue
            if store.fs.size(path) != meta["bytes"]:
                problems.append(f"{r}: {rel}: size {store.fs.size(path)} != {meta['bytes']} in the manifest")
            elif file_digest(path, store.fs) != meta["sha256"]:
                problems.append(f"{r}: {rel}: sha256 differs from the manifest (modified)")
    if ref is None:
        problems += [f"{p}: no {MANIFEST} (unfinished or damaged: it does not exist)" for p in _unfinished(store)]
        problems += leftovers(store, refs)
    if unsealed:
        log.warning("%d manifest(s) carry no digest of their own (written before manifests did): their files were "
                    "checked, their own fields cannot be: %s", len(unsealed), ", ".join(unsealed[:5]))
    return problems


def leftovers(store: Store, refs: list[ArtifactRef]) -> list[str]:
    """What an object store keeps (and bills) that no manifest names: files of an attempt the
    committed manifest does not name (a stale holder's late writes, after the commit's sweep;
    the next process that locks the artifact sweeps them), and unfinished multipart uploads (a
    killed model upload: no listing of files shows them)."""
    if not store.remote:
        return []
    out = []
    for r in refs:
        try:
            keep = store.manifest(r).get("attempt")
        except IntegrityError:
            continue                         # reported; nothing is swept on a damaged manifest's word
        for a in store._ls(store.path(r, ATTEMPTS)):
            if a.rsplit("/", 1)[-1] != keep:
                n = len(files_under(store.fs, a))
                out.append(f"{r}: {ATTEMPTS}/{a.rsplit('/', 1)[-1]}: {n} file(s) its manifest does not name "
                           "(an attempt's leftovers, e.g. a stale holder's late writes): garbage, swept by the next "
                           "process that locks this artifact")
    for u in pending_uploads(store.fs, store.path()):
        out.append(f"{store.fs.unstrip_protocol(u['path'])}: an unfinished multipart upload (started "
                   f"{u['initiated']}): its parts are stored until it is aborted (a sweep of its attempt aborts it)")
    return out


def _manifest_or_none(store: Store, ref: ArtifactRef) -> dict | None:
    """A manifest to compare with, or None if it is damaged (`verify` reports it)."""
    try:
        return store.manifest(ref)
    except IntegrityError:
        return None


def _unfinished(store: Store) -> list[str]:
    out = []
    for stage_dir in store._ls(store._base):
        stage = stage_dir.rsplit("/", 1)[-1]
        if stage.startswith(".") or stage in ("runs", "leaderboard", "iterations"):
            continue
        for d in store._ls(stage_dir):
            if not store.fs.exists(f"{d}/{MANIFEST}"):
                out.append(f"{stage}/{d.rsplit('/', 1)[-1]}")
    return out


def sample_markdown(records: list[dict], n: int = 3, width: int = 300) -> str:
    """A few records as markdown for a person: prompt, answer (+ score), the first critique with
    its rating, its first refinement with its score. Other record shapes show as short JSON.

    >>> print(sample_markdown([{"id": "p1", "messages": [{"role": "user", "content": "2+2?"}], "answer": "5",
    ...                         "answer_score": 3.0, "critiques": [{"text": "Wrong.", "rating": 2, "forced": True,
    ...                         "refinements": [{"text": "4", "score": 7.5}]}]}]))
    **p1**
    - prompt: 2+2?
    - answer (score 3.0): 5
    - critique (rating 2, forced): Wrong.
    - refinement (score 7.5): 4
    <BLANKLINE>
    """
    import json

    cut = lambda t: (t if len(t) <= width else t[:width] + " …").replace("\n", " ")  # noqa: E731
    out = []
    for r in records[:n]:
        if "messages" in r and r.get("answer") is not None:
            lines = [f"**{r.get('id')}**", f"- prompt: {cut(r['messages'][-1]['content'])}",
                     f"- answer (score {r.get('answer_score', 'n/a')}): {cut(r['answer'])}"]
            for c in r.get("critiques", [])[:1]:
                forced = ", forced" if c.get("forced") else ""
                lines.append(f"- critique (rating {c.get('rating')}{forced}): {cut(c['text'])}")
                for f in c.get("refinements", [])[:1]:
                    lines.append(f"- refinement (score {f.get('score', 'n/a')}): {cut(f['text'])}")
        else:
            lines = [f"**{r.get('id', '?')}**", "```", cut(json.dumps(r, ensure_ascii=False)), "```"]
        out.append("\n".join(lines) + "\n")
    return "\n".join(out)


_WHY = {"config": "changed config", "inputs": "new inputs", "code_version": "new code version"}


def recompute_reason(store: Store, ref: ArtifactRef, before: str | None = None) -> str:
    """Why a stage was computed rather than reused: compared with the earlier artifacts of the
    same stage (those created before `before`, an ISO time such as the run's start), which one
    of (config, inputs, code version) differs. Upstream changes show as "new inputs" all the way
    down, which is what they are."""
    m = store.manifest(ref)
    cutoff = before or m.get("created") or ""
    earlier = [o for o in (_manifest_or_none(store, r) for r in store.list(ref.stage) if r.key != ref.key) if o]
    earlier = [o for o in earlier if (o.get("created") or "") <= cutoff]
    if not earlier:
        return "first artifact of this stage in the store"
    reasons = set()
    for o in earlier:
        diff = [f for f in _WHY if o.get(f) != m.get(f)]
        if diff == ["code_version"] and o.get("code_files") and m.get("code_files"):
            new, old = m["code_files"], o["code_files"]   # which files' used code differs
            changed = sorted(f for f in set(new) | set(old) if new.get(f) != old.get(f))
            more = f" (+{len(changed) - 3} more)" if len(changed) > 3 else ""
            reasons.add("new code in " + ", ".join(changed[:3]) + more)
        elif len(diff) == 1:
            reasons.add(_WHY[diff[0]])
    return ", ".join(sorted(reasons)) or "new combination of config, inputs and code"
