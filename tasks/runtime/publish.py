"""A stage's results on its Prefect run (the UI's Artifacts tab): tables, markdown, plots and a
link to the artifact. Showing never fails a stage: the store is the record."""
from __future__ import annotations

import base64
import json
import os

from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact

from avr_core.catalog import sample_markdown
from avr_core.redact import redact  # artifacts live in Prefect's database: no secret goes there
from avr_core.store import ArtifactRef, Store
from tasks.runtime.ledger import logger


def publish(ref: ArtifactRef, key: str, table: list[dict] | None = None, markdown: str | None = None) -> None:
    """Show a stage's result on its Prefect run (UI "Artifacts" tab): a table and/or markdown,
    plus a link to the artifact directory. Never fails the stage: the store is the record."""
    if table is not None:
        table = [{k: redact(v) if isinstance(v, str) else v for k, v in row.items()} for row in table]
    markdown = redact(markdown) if markdown is not None else None
    try:
        if table is not None:
            create_table_artifact(table=table, key=key, description=f"{ref} ({ref.path})")
        if markdown is not None:
            create_markdown_artifact(markdown=markdown, key=f"{key}-report", description=str(ref))
        create_link_artifact(link=ref.path if "://" in ref.path else f"file://{os.path.abspath(ref.path)}",
                             link_text=str(ref), key=f"{key}-dir", description="artifact directory")
    except Exception as e:  # no API reachable: the artifact in the store is what counts
        logger().warning("could not publish Prefect artifact %s: %s", key, e)


def publish_plot(ref: ArtifactRef, key: str, png: bytes, table: list[dict], caption: str, text: str = "") -> None:
    """A plot (embedded as a data URI: the UI renders markdown, not local files) and its table."""
    img = f"![{caption}](data:image/png;base64,{base64.b64encode(png).decode()})"
    publish(ref, key, table=table, markdown=f"{img}\n\n{text}\n\nstore: `{ref.path}`")


def publish_stage(store: Store, ref: ArtifactRef, manifest: dict) -> None:
    """The stage's Prefect artifacts: counts (inputs, outputs, every filter's drops, parse
    failures, tokens, time), a sample of three records, and a link to its directory."""
    table = [{"count": f"rows:{k}", "value": v} for k, v in manifest["rows"].items()]
    table += [{"count": k, "value": v} for k, v in sorted(manifest["counts"].items())]
    table.append({"count": "compute_s", "value": manifest.get("compute_s")})
    names = sorted(manifest["rows"], key=lambda n: (n != "records", n))
    first = next((f for f in sorted(manifest["files"]) if names and f.startswith(f"data/{names[0]}-")), None)
    recs: list[dict] = []
    if first:   # three records from the first data file: never the whole (possibly huge) artifact
        with store.fs.open(store.object_path(ref, first, manifest), "r", encoding="utf-8") as f:
            recs = [json.loads(line) for _, line in zip(range(3), f)]
    sample = sample_markdown(recs)
    publish(ref, ref.stage.replace("_", "-"), table=table,
            markdown=f"### {ref}\n\n{sample}\n\nstore: `{ref.path}`")

