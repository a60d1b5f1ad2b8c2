"""A stage's results on its Prefect run (the UI's Artifacts tab): tables, markdown, plots and a
link to the artifact. Showing never fails a stage: the store is the record."""
from __future__ import annotations

import base64
import json
import os

from prefect.artifacts import create_markdown_artifact, create_table_artifact

from avr_core.catalog import sample_markdown
from avr_core.redact import redact  # artifacts live in Prefect's database: no secret goes there
from avr_core.store import ArtifactRef, Store
from tasks.runtime.ledger import logger


def publish(ref: ArtifactRef, key: str, table: list[dict] | None = None, markdown: str | None = None) -> None:
    """Show a stage's result on its Prefect run (UI "Artifacts" tab): a table (`key`) and/or
    markdown (`key-report`), each naming the artifact and its place in the store. No link
    artifact: a `file://` link is one a browser will not open. Never fails the stage: the store is
    the record."""
    if table is not None:
        table = [{k: redact(v) if isinstance(v, str) else v for k, v in row.items()} for row in table]
    markdown = redact(markdown) if markdown is not None else None
    try:
        if table is not None:
            create_table_artifact(table=table, key=key, description=f"{ref} ({_where(ref)})")
        if markdown is not None:
            create_markdown_artifact(markdown=markdown, key=f"{key}-report", description=f"{ref} ({_where(ref)})")
    except Exception as e:  # no API reachable: the artifact in the store is what counts
        logger().warning("could not publish Prefect artifact %s: %s", key, e)


def _where(ref: ArtifactRef) -> str:
    """The artifact's place: its s3:// URL, or its absolute local path."""
    return ref.path if "://" in ref.path else os.path.abspath(ref.path)


def plot_markdown(png: bytes, caption: str) -> str:
    """A plot as markdown, embedded as a data URI: the UI renders markdown, not local files."""
    return f"![{caption}](data:image/png;base64,{base64.b64encode(png).decode()})"


def publish_plot(ref: ArtifactRef, key: str, png: bytes, table: list[dict], caption: str, text: str = "") -> None:
    """A run-level plot and its table (a stage's plot goes into its pair instead: `view`)."""
    publish(ref, key, table=table, markdown=f"{plot_markdown(png, caption)}\n\n{text}\n\nstore: `{ref.path}`")


def publish_stage(store: Store, ref: ArtifactRef, manifest: dict, cached: bool = False, view: str = "") -> None:
    """The stage's Prefect artifacts, a pair: counts (inputs, outputs, every filter's drops, parse
    failures, tokens, time) and a report: the stage's own view (`view`: a plot, for the stages that
    draw one) and a sample of three records. On a cache hit the same pair, on this run's page, says
    so and names the run that computed it (manifest `run`). One pair per stage, its keys the
    stage's name: a plot published beside it under the same key once made two `tts-curve-report`
    artifacts on one run, and the UI showed either."""
    origin = f"from cache: computed by run {manifest.get('run') or '(before runs were recorded)'}"
    table = [{"count": "cached", "value": origin}] if cached else []
    table += [{"count": f"rows:{k}", "value": v} for k, v in manifest["rows"].items()]
    table += [{"count": k, "value": v} for k, v in sorted(manifest["counts"].items())]
    table.append({"count": "compute_s", "value": manifest.get("compute_s")})
    names = sorted(manifest["rows"], key=lambda n: (n != "records", n))
    first = next((f for f in sorted(manifest["files"]) if names and f.startswith(f"data/{names[0]}-")), None)
    recs: list[dict] = []
    if first:   # three records from the first data file: never the whole (possibly huge) artifact
        with store.fs.open(store.object_path(ref, first, manifest), "r", encoding="utf-8") as f:
            recs = [json.loads(line) for _, line in zip(range(3), f)]
    sample = sample_markdown(recs)
    note = f"**{origin}**\n\n" if cached else ""
    view = f"{view}\n\n" if view else ""
    publish(ref, ref.stage.replace("_", "-"), table=table,
            markdown=f"### {ref}\n\n{note}{view}{sample}\n\nstore: `{_where(ref)}`")

