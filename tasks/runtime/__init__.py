"""The stage runtime: what turns a stage declaration in tasks/ into a cached, locked, retried,
sharded Prefect task over the artifact store. A stage module imports what it declares with from
here; the modules, lowest first (each imports only those above it):

    keys.py          what a cache key is made of: model/scorer identities, `Spec`, code versions
    ledger.py        this process's record of its stage calls: logger, wall times, engine events
    ray_workers.py   a stage's shards on Ray actors (`scale.engine: ray`)
    output.py        `Output` (shards, files, manifest fields) and the `Backend`/`Lazy` proxies
    publish.py       a stage's results as Prefect artifacts
    supervision.py   training as a supervised subprocess: checkpoints, resume, object-store sync
    skeleton.py      `run_stage` (lock -> cache -> inputs -> body -> manifest) and `@stage`

docs/DESIGN.md "Adding a stage" walks through a declaration.
"""
from tasks.runtime.keys import Spec, policy_identity, scorer_identity
from tasks.runtime.ledger import logger
from tasks.runtime.output import Backend, Lazy, Output
from tasks.runtime.publish import plot_markdown, publish, publish_plot
from tasks.runtime.skeleton import model_artifacts, stage, store_of

__all__ = ["Backend", "Lazy", "Output", "Spec", "logger", "model_artifacts", "plot_markdown", "policy_identity",
           "publish", "publish_plot", "scorer_identity", "stage", "store_of"]
