"""The run configuration: a typed schema, YAML presets, `key=value` overrides.

    cfg = load_config("tiny", ["critique.k=3"])   # conf/base.yaml <- conf/tiny.yaml <- overrides

An unknown key or a wrong type is a `ConfigError` naming the key (and the file and line it came from);
range checks (`validate`) run before any work. `to_yaml(cfg)` is what each run saves.
"""
from __future__ import annotations

import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from avr_core.backends import GENERATORS, SCORERS, backend_class

# The training losses, by name: "sft" and avr_core/losses' PREFERENCE_LOSSES (that package imports
# torch, too heavy for reading a config; tests/core/test_config.py holds the two equal).
LOSSES = ("sft", "dpo", "ipo", "simpo", "rm_margin")
SCHEDULED_FLOWS = ("pipeline", "synthesis", "stage1", "stage2", "evaluate")   # flows/deploy.py's deployments


def _one_of(names) -> str:
    """The message for a value outside `names` (a registry, or a tuple).

    >>> _one_of({"hf": 1, "vllm": 2})
    'must be one of hf, vllm'
    """
    return "must be one of " + ", ".join(names)

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


@dataclass
class ModelConfig:
    path: str = "embedded:smollm2-135m-instruct"   # embedded:NAME, a local directory, or a hub id
    dtype: str = "float32"                          # float32 | bfloat16 | float16
    trust_remote_code: bool = False                 # off unless explicitly enabled (logged)


@dataclass
class BackendConfig:
    kind: str = "hf"                 # hf | vllm | openai
    batch_size: int = 8              # hf: conversations per forward batch
    base_url: str = ""               # openai: e.g. http://127.0.0.1:8000/v1
    served_model: str = ""           # openai: the server's model name (default: policy path)
    api_key_env: str = "OPENAI_API_KEY"
    concurrency: int = 16
    timeout_s: float = 120.0
    max_retries: int = 4
    down_budget_s: float = 300.0     # openai: server down (no answer but 5xx) this long -> the stage fails
    tensor_parallel_size: int = 1    # vllm: GPUs per engine
    data_parallel_size: int = 1      # vllm: engines (one process each); 0 = as many as the allowed GPUs hold
    gpu_memory_utilization: float = 0.9
    max_model_len: int = 4096
    device: str = "auto"             # hf, vllm: auto (CUDA if present) | cpu | cuda | cuda:N (docs/SCALING.md)
    gpus: list = field(default_factory=list)   # GPU indices this backend may use ([] = all visible);
                                     #   disjoint generator/scorer gpus (or both on the CPU) = both may
                                     #   stay resident
    keep_engine: bool = False        # keep the engine after its stage (respond -> critique -> refine)
    enforce_eager: bool = False      # vllm: no torch.compile / graph capture (an engine starts in ~25 s
                                     #   on 2 CPU cores instead of 60-90 s; slower steps on GPUs)
    kv_cache_gb: float = 2.0         # vllm on CPU: KV cache per engine, GiB (VLLM_CPU_KVCACHE_SPACE);
                                     #   GPUs size it by gpu_memory_utilization
    per_request_seed: bool = False   # vllm: seed every request (samples independent of batching, but it
                                     #   turns off vLLM's fast FlashInfer sampler; avr_core/backends/vllm_offline.py)


@dataclass
class SamplingConfig:
    temperature: float = 0.7
    top_p: float = 0.8
    max_new_tokens: Optional[int] = 512  # null: up to the model's context (the authors set no cap:
                                         #   `resolve_max_new_tokens`)
    seed: int = 0


@dataclass
class RespondConfig:
    use_dataset_answer: bool = True  # a prompt row's final assistant turn is y0
    keep_empty: bool = False         # an empty / whitespace-only policy answer: dropped, counted (ours) |
                                     #   kept (authors: only a failed request is dropped)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)


@dataclass
class CritiqueConfig:
    k: int = 2                       # critiques per answer
    max_tries: int = 5               # samples per critique slot until a [[k]] parses (release: 5)
    force_rating: bool = False       # instead of dropping, complete "Rating: [[" (docs/DESIGN.md step 2)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)


@dataclass
class RefineConfig:
    m: int = 2                       # refinements per critique
    conversation_judge: str = "sampling"  # judge turn of [x, y0, JUDGE, c, REFINE]: sampling (ours: the
                                     #   text c was sampled from) | refine (authors: individual_refine's
                                     #   "Your evaluation" copy)
    keep_empty: bool = False         # an empty / whitespace-only refinement: dropped, counted (ours) | kept
                                     #   and scored (authors; stage 1 and the stage-2 search)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)


@dataclass
class ScorerConfig:
    kind: str = "judge"              # hf_rm (Bradley-Terry reward model) | judge (expected rating)
                                     #   | vllm_rm, vllm_judge (the same two, served by vLLM)
                                     #   | rules (fraction of the prompt's verifiable constraints met)
    constraints: str = ""            # rules: the prompt file whose rows carry `constraints` (usually
                                     #   ${data.prompts}); avr_core/backends/rules.py
    model: ModelConfig = field(default_factory=lambda: ModelConfig(dtype="auto"))
                                     # dtype auto: bfloat16 on a GPU, float32 on the CPU, resolved at load
                                     #   (avr_core/backends/hf.py resolve_dtype); set it to pin one
    batch_size: int = 8
    max_length: int = 4096
    over_long: str = "truncate"      # hf_rm / vllm_rm input over max_length tokens: truncate (ours: cut on the
                                     #   right, scored, counted) | skip (authors: not scored, counted; the
                                     #   answer it carries is dropped)
    device: str = "auto"             # auto | cpu | cuda | cuda:N; a model larger than one GPU: device_map=auto
    gpus: list = field(default_factory=list)   # GPU indices for the scorer ([] = all visible)
    tensor_parallel_size: int = 1    # vllm_rm (hf_rm on vLLM's pooling runner), vllm_judge: GPUs per engine
    data_parallel_size: int = 1      # vllm_rm, vllm_judge: engines; 0 = as many as the allowed GPUs hold
    gpu_memory_utilization: float = 0.9   # vllm_rm, vllm_judge
    enforce_eager: bool = False      # vllm_rm, vllm_judge: as generator.enforce_eager
    kv_cache_gb: float = 2.0         # vllm_rm, vllm_judge on CPU: as generator.kv_cache_gb
    base_url: str = ""               # vllm_rm: a running vLLM server (its /classify) instead of an engine here
    served_model: str = ""           # vllm_rm with base_url: the server's model name
    keep_engine: bool = False


@dataclass
class SelectConfig:
    length_extra_chars: int = 400    # RSFT: drop y* if >= this many chars longer than y0 ...
    length_ratio: float = 1.2        # ... AND >= this many times as long
    redundancy_threshold: int = 60   # any word / symbol run this often -> degenerate
    response_pairs: bool = True
    critique_pairs: bool = True
    refinement_pairs: bool = True
    # Where the authors' scripts differ (docs/FIDELITY.md; conf/paper.yaml sets the authors' side):
    drop_unchanged: bool = True      # refinements that copy y0 are not candidates (authors: kept)
    ties: str = "first"              # first | authors (y* = last best; refinement pair: last worst)
    record_gate: bool = False        # authors: redundant y0/y* or no improvement -> no pairs at all
    refinement_needs_critique: bool = False  # authors: refinement pair only if c+ passes the critique gate
    refinement_skip_at_answer: bool = False  # authors: no refinement pair when r(rejected) == r(y0)
    group_critiques_by_text: bool = False    # authors: identical critique texts are one critique
    rsft_redundancy: bool = True     # drop degenerate y0/y* from RSFT (authors: no check)
    rsft_judge: str = "dpo"          # dpo | sft: judge text of RSFT examples (authors: sft)
    rsft_mix_chosen: bool = False    # authors: RSFT data + every unused dataset `chosen` conversation


@dataclass
class TrainConfig:
    """One recipe for RSFT and preference optimisation (docs/DESIGN.md step 6), on DeepSpeed."""

    loss: str = "sft"                # sft | dpo | ipo | simpo | rm_margin
    beta: float = 0.1                # dpo / ipo / simpo / rm_margin temperature
    gamma: float = 0.5               # simpo target margin; rm_margin scale on r_chosen - r_rejected
    lr: float = 5.0e-7
    weight_decay: float = 0.0
    warmup_ratio: float = 0.1
    epochs: int = 1
    step_cap: int = -1              # > 0 caps optimizer steps (tiny runs, tests)
    micro_batch_size: int = 1        # sequences (sft) or pairs (po) per forward, per device
    grad_accum: int = 1
    max_length: int = 2048           # tokens; longer examples are truncated AND counted
    last_turn_only: bool = False     # loss on the last assistant turn only
    zero_stage: int = 2              # DeepSpeed ZeRO stage (CPU: 0-2)
    bf16: bool = False               # GPUs: true
    gradient_checkpointing: bool = False
    checkpoint_every: int = 50       # optimizer steps between checkpoints in the store
    num_gpus: int = 0                # > 1: the task starts the `deepspeed` launcher as a subprocess
    device: str = "auto"             # reference log-probs: auto | cpu | cuda | cuda:N
    ref_batch_size: int = 4          # reference log-probs: at most this many pairs per forward, length-sorted
    ref_token_budget: int = 16384    # ... and at most this many tokens (rows x padded length) per forward
    zero3_persistence_threshold: int = -1   # ZeRO-3: parameters under this many elements stay resident on
                                     #   every rank; -1: DeepSpeed's default (1e5); 0: all gathered and released
    seed: int = 0


@dataclass
class SearchStageConfig:
    """Stage 2 greedy search (docs/DESIGN.md step 7) and the seed's thought drop rules (step 8)."""

    k: int = 2
    m: int = 2
    max_rounds: int = 5
    start: str = "respond"           # y0 of the search: respond (ours: as respond.use_dataset_answer says)
                                     #   | dataset (authors: the dataset's chosen answer, always)
    drop_no_first_improvement: bool = True
    drop_no_terminating_critique: bool = True
    drop_redundant_answer: bool = True   # a degenerate y0 gives no thought (authors too)
    drop_marker_in_text: bool = True     # ours: a thought that does not parse back is dropped (authors: kept)


@dataclass
class ThoughtSampleConfig:
    """Stage 2 sampling of S long thoughts per fresh prompt and their pairing (step 9)."""

    s: int = 5
    min_margin: float = 0.0
    length_rule: str = "pick"        # pick | drop (see avr_core.selection.ThoughtPairRules)
    extract: str = "ours"            # final-answer rule: ours (Final answer section after the END marker,
                                     #   else last improvement, else raw) | authors (src/utils.py regex)
    final_answer_tries: int = 1      # samples per thought slot until the rule finds a final answer (authors: 2)
    drop_no_final: bool = False      # authors: a slot with no final answer after the tries is dropped
    beat_answer: bool = False        # authors: the best thought must score above the dataset's answer
    sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(max_new_tokens=4096))


@dataclass
class ScalingConfig:
    """Test-time scaling (docs/DESIGN.md step 11): the Stage-1 model refines held-out prompts for
    R = 0..rounds rounds at inference; one run gives every R (the answer after each round)."""

    rounds: int = 5                  # the curve's largest R (the paper: 0..5)
    sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(temperature=0.0, max_new_tokens=2048))


@dataclass
class JudgeConfig:
    """An alpaca-eval pairwise judge (docs/DESIGN.md step 10): the AlpacaEval 2 default annotator's
    prompt and m/M log-prob rule, answered by an OpenAI-compatible endpoint or a local model."""

    kind: str = "openai"             # openai (GPT-4 Turbo, or `vllm serve` on 127.0.0.1) | local (HF model here)
    annotator: str = "weighted_alpaca_eval_gpt4_turbo"
    model: str = "gpt-4-1106-preview"    # openai: the served judge model
    base_url: str = ""               # openai: "" = api.openai.com; e.g. http://127.0.0.1:8000/v1
    api_key_env: str = "OPENAI_API_KEY"  # the key is read from this variable, never stored
    concurrency: int = 4
    local_model: str = "embedded:smollm2-135m-instruct"   # local: the judge model
    device: str = "auto"             # local: auto | cpu | cuda | cuda:N


@dataclass
class EvalConfig:
    """AlpacaEval-style evaluation of every model the pipeline makes (docs/DESIGN.md step 10)."""

    prompts: str = "avr_core/data/alpaca_eval/alpaca_eval_805.json"  # alpaca-eval format, `output` = reference
    slice: list = field(default_factory=lambda: [0, 805])
    models: list = field(default_factory=lambda: ["seed", "rsft", "stage1", "stage2"])
    rounds: int = 1                  # R explicit refinement rounds for the Stage-1 model (0..5)
    sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(temperature=0.0, max_new_tokens=2048))
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    position_bias_n: int = 50        # instructions judged in both fixed orders (0 = skip the check)
    lc_min_annotations: int = 10     # the offline LC GLM needs this many parsed judgements, else no LC
                                     #   (ours: a 5-fold fit on fewer is noise) | 0 (alpaca-eval: always fit)
    df_gamed: str = ""               # official LC: a local copy of alpaca-eval's df_gamed.csv, or "hub"
                                     #   (alpaca-eval's own loader; unreachable -> the labelled fallback)
    references: str = "file"         # file: the `output` of eval.prompts | hub: AlpacaEval 2's GPT-4 Turbo
                                     #   reference outputs (tatsu-lab/alpaca_eval, alpaca_eval_gpt4_baseline)
    extract: str = "ours"            # Stage-2 final-answer rule (as thought.extract)
    final_answer_tries: int = 1      # samples per prompt until the rule finds a final answer (authors: 5);
                                     #   then our fallback answer (never dropped; the authors drop: counted)
    smoke: bool = False              # label the leaderboard as a smoke run, not a benchmark result
    allow_example_references: bool = False   # references=hub unreachable: false = an error before any work
                                     #   (a paper number is judged against AlpacaEval 2's references or not
                                     #   at all) | true = judge against eval.prompts' own, labelled (tiny)


@dataclass
class DataConfig:
    prompts: str = "avr_core/data/tiny_prompts.jsonl"  # JSONL | JSON | Parquet | saved HF dataset dir
                                                       # | hf://<dataset>:<split> (loaded with `datasets`)
    # Slices [start, stop) of the prompt file for each use (docs/DESIGN.md step 6: fresh prompts). stage1_*
    # may end in null (to the end of the file); stage1_po == stage1_sft re-uses the RSFT prompts
    # for the PO synthesis (the authors' scripts/stage1_generation.sh: one run, the whole split).
    stage1_sft: list = field(default_factory=lambda: [0, 12])
    stage1_po: list = field(default_factory=lambda: [12, 24])
    stage2: list = field(default_factory=lambda: [24, 30])
    stage2_po: list = field(default_factory=lambda: [30, 36])
    heldout: list = field(default_factory=lambda: [36, 48])
    # flow: signal only: a second held-out slice the seed and the Stage-1 model also answer, reported
    # apart (conf/signal_v2.yaml: the old preset's held-out prompts); [] = none
    heldout_extra: list = field(default_factory=list)


@dataclass
class ScheduleConfig:
    """The nightly rerun of the pipeline deployment (`avr serve`); unchanged stages come from cache."""

    cron: str = "0 2 * * *"          # 02:00 every day
    timezone: str = "UTC"            # IANA name, e.g. Europe/Berlin
    active: bool = False             # on/off switch: a preset or override turns it on
    flow: str = "pipeline"           # the deployment it fires: pipeline | synthesis | stage1 | stage2 | evaluate
    max_runs: int = 1                # flow runs at once on the `avr deploy` work pool: a second run waits
                                     #   (Scheduled, then Late) while the first holds the node's GPUs
    zombie_after_s: int = 600        # `avr deploy`'s automation marks a Running run Crashed after this long
                                     #   without a heartbeat (the deployments and `avr serve` make runs beat
                                     #   three times in it: flows/deploy.py heartbeat_s)


@dataclass
class IterateConfig:
    """Iterative AvR (README "Iterations"): the pipeline N times, iteration t+1 starting from
    iteration t's model on fresh prompt slices; every completed iteration is recorded in the store."""

    count: int = 1                   # iterations this run adds
    model: str = "stage1"            # stage1 | stage2: which model of iteration t starts iteration t+1
    prompt_stride: int = 0           # iteration t shifts the training slices (data.stage1_sft .. stage2_po)
                                     #   by t * stride rows; 0 = their span (disjoint, fresh prompts)
    continue_last: bool = False      # start after the last completed iteration in the store (nightly)


@dataclass
class ScaleConfig:
    """Where work runs (docs/SCALING.md "Many machines"). Never part of a key: the same config on
    1 or 32 workers gives the same artifacts, byte for byte."""

    engine: str = "local"            # local: a stage's shards one after another in its task (today's run)
                                     #   | ray: `workers` Ray actors, one engine each (tasks/runtime/ray_workers.py)
    workers: int = 2                 # ray: actors per stage (e.g. one per GPU of the cluster)
    address: str = ""                # ray: "" = a local Ray cluster; "auto" or host:port = a running one
    cpus_per_worker: float = 1.0     # ray: resources each actor requests
    gpus_per_worker: float = 0.0     #   (1 on GPU nodes: an actor holds one engine on one GPU)
    retries: int = 1                 # ray: a shard whose worker died is redone this often, then the stage fails
    max_restarts: int = 4            # ray: a dead worker process is restarted this often per stage
    hostfile: str = ""               # training: a DeepSpeed hostfile ("node1 slots=8" per line): multi-node
    num_nodes: int = 0               # training: how many of the hostfile's nodes to use (0: all)


@dataclass
class HubConfig:
    """Whether runs may download from the Hugging Face hub (avr_core/hub.py). The user's choice:
    an exported HF_HUB_OFFLINE wins over this key."""

    offline: bool = False            # true: the local cache only, never the network (tiny, air-gapped
                                     #   clusters) | false: download what the preset names (paper)


@dataclass
class StoreConfig:
    root: str = "./artifacts"        # path or fsspec URL; AVR_STORE overrides
    lease_s: float = 60.0            # object stores: an artifact's lease is taken over after this long
                                     #   without renewal (its holder renews it every lease_s / 3)
    lock_timeout_s: float = 0        # wait at most this long for another process computing the
                                     # same artifact, then fail naming it (0: as long as it runs)
    stall_s: float = 7200            # object stores: a holder that writes nothing (no shard, no
                                     #   checkpoint, no training CPU time) this long gives its lease up


@dataclass
class AvrConfig:
    preset: str = "base"
    store: StoreConfig = field(default_factory=StoreConfig)
    hub: HubConfig = field(default_factory=HubConfig)
    data: DataConfig = field(default_factory=DataConfig)
    policy: ModelConfig = field(default_factory=ModelConfig)
    generator: BackendConfig = field(default_factory=BackendConfig)
    scorer: ScorerConfig = field(default_factory=ScorerConfig)
    respond: RespondConfig = field(default_factory=RespondConfig)
    critique: CritiqueConfig = field(default_factory=CritiqueConfig)
    refine: RefineConfig = field(default_factory=RefineConfig)
    select: SelectConfig = field(default_factory=SelectConfig)
    rsft: TrainConfig = field(default_factory=lambda: TrainConfig(loss="sft", lr=1.0e-6))
    po: TrainConfig = field(default_factory=lambda: TrainConfig(loss="dpo", lr=5.0e-7))
    search: SearchStageConfig = field(default_factory=SearchStageConfig)
    thought: ThoughtSampleConfig = field(default_factory=ThoughtSampleConfig)
    cot_sft: TrainConfig = field(default_factory=lambda: TrainConfig(loss="sft", lr=1.0e-6))
    cot_po: TrainConfig = field(default_factory=lambda: TrainConfig(loss="dpo", lr=5.0e-7))
    tts: ScalingConfig = field(default_factory=ScalingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    iterate: IterateConfig = field(default_factory=IterateConfig)
    scale: ScaleConfig = field(default_factory=ScaleConfig)
    shard_size: int = 64             # prompts per committed shard of a long stage
    flow: str = "pipeline"           # what `avr run` runs: pipeline (everything) | signal (stage 1 +
                                     #   learning signal + test-time scaling: flows/learning_signal.py)


class ConfigError(ValueError):
    """A config or override problem; the message names the key (and file)."""


def default_store_root() -> str:
    """The store a command uses when not told: $AVR_STORE, else `store.root`'s default (./artifacts)."""
    import os

    return os.environ.get("AVR_STORE") or StoreConfig.root


def preset_path(preset: str) -> Path:
    p = Path(preset)
    if p.suffix in (".yaml", ".yml"):
        return p
    return CONF_DIR / f"{preset}.yaml"


def _merge(base: DictConfig, layer: Any, origin: str, key: str = "?") -> DictConfig:
    """`origin` is a YAML file (the error then names the key's line) or an override item."""
    try:
        return OmegaConf.merge(base, layer)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or key
        line = _yaml_line(Path(origin), key) if origin.endswith((".yaml", ".yml")) else None
        raise ConfigError(f"{origin}{f':{line}' if line else ''}: key '{key}': {_first_line(e)}") from None


def _yaml_line(path: Path, key: str) -> int | None:
    """1-based line of the dotted `key` in a YAML file (of its deepest part found there)."""
    import yaml

    try:
        node = yaml.compose(path.read_text(encoding="utf-8"), Loader=yaml.SafeLoader)
    except Exception:  # only a better message is lost
        return None
    line = None
    for part in key.split("."):
        if not isinstance(node, yaml.MappingNode):
            break
        match = [(k, v) for k, v in node.value if getattr(k, "value", None) == part]
        if not match:
            break
        line, node = match[0][0].start_mark.line + 1, match[0][1]
    return line


def _first_line(e: Exception) -> str:
    return str(e).strip().splitlines()[0]


def parse_overrides(overrides: list[str] | tuple[str, ...]) -> DictConfig:
    """`["critique.k=3", "store.root=/tmp/a"]` -> a DictConfig; a malformed item is an error naming
    the item and its key: not key=value, a control character, a value YAML cannot parse."""
    import yaml

    for o in overrides:
        key, eq, _ = o.partition("=")
        bad = next(((i, c) for i, c in enumerate(o) if unicodedata.category(c) == "Cc"), None)
        if bad:   # YAML refuses most of them in two lines; a newline would split our one line
            raise ConfigError(f"override {o!r}: key {key.strip()!r}: a control character ({bad[1]!r}, character "
                              f"{bad[0] + 1}); config keys and values are text without control characters")
        if not eq or not key.strip() or any(c.isspace() for c in key):
            raise ConfigError(f"override {o!r}: expected key=value, e.g. critique.k=3")
    try:
        return OmegaConf.from_dotlist(list(overrides))
    except (OmegaConfBaseException, yaml.YAMLError):
        for o in overrides:      # which item: each alone
            key = o.partition("=")[0].strip()
            try:
                OmegaConf.from_dotlist([o])
            except yaml.YAMLError as e:
                why = getattr(e, "problem", None) or _first_line(e)
                raise ConfigError(f"override {o!r}: key '{key}': not valid YAML ({why}); to pass it as text, quote "
                                  f"it for YAML inside the shell's quotes: {key}=\"'...'\"") from None
            except OmegaConfBaseException as e:
                raise ConfigError(f"override {o!r}: key '{key}': {_first_line(e)}") from None
        raise


def _resolve_all(cfg: DictConfig, overrides, presets: list[Path]) -> None:
    """Every `${...}` interpolation resolves, or a ConfigError whose first words name the key, and
    where it was set: the override item, else the preset file and line."""
    try:
        OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as e:
        key = str(getattr(e, "full_key", None) or "?")
        items = [o for o in overrides if o.partition("=")[0].strip() == key]
        lines = [(path, _yaml_line(path, key)) for path in presets]
        found = [f"{path}:{line}: " for path, line in lines if line]
        where = f"override {items[-1]!r}: " if items else (found[-1] if found else "")
        raise ConfigError(f"{where}key '{key}': {_first_line(e)}") from None


def _yaml_error(path: Path, e: Exception) -> ConfigError:
    """A YAML file the parser refuses: ONE line naming the file and line. A scanner or parser error
    carries its mark; a reader error (a control byte) only a character position."""
    mark, problem = getattr(e, "problem_mark", None), getattr(e, "problem", None)
    if mark:
        return ConfigError(f"{path}:{mark.line + 1}: invalid YAML: {problem or _first_line(e)} "
                           f"(column {mark.column + 1})")
    if isinstance(e, UnicodeDecodeError):
        data = path.read_bytes()
        line = data.count(b"\n", 0, e.start) + 1
        return ConfigError(f"{path}:{line}: invalid YAML: not UTF-8 (byte {data[e.start:e.start + 1]!r})")
    pos = getattr(e, "position", None)
    if pos is None:
        return ConfigError(f"{path}: invalid YAML: {_first_line(e)}")
    text = path.read_text(encoding="utf-8", errors="replace")[:pos]
    return ConfigError(f"{path}:{text.count(chr(10)) + 1}: invalid YAML: {_first_line(e)} "
                       f"(column {pos - text.rfind(chr(10))})")


def load_config(preset: str = "tiny", overrides: list[str] | tuple[str, ...] = ()) -> DictConfig:
    """Schema <- conf/base.yaml <- conf/<preset>.yaml <- overrides, validated."""
    import os

    cfg = OmegaConf.structured(AvrConfig)
    for path in [CONF_DIR / "base.yaml", preset_path(preset)]:
        if not path.exists():
            known = sorted(p.stem for p in CONF_DIR.glob("*.yaml"))
            raise ConfigError(f"{path}: preset not found (known presets: {known})")
        try:
            layer = OmegaConf.load(path)
        except Exception as e:  # malformed YAML, a control byte, not UTF-8
            raise _yaml_error(path, e) from None
        if not isinstance(layer, DictConfig):
            raise ConfigError(f"{path}: expected a mapping of config keys (like 'critique: {{k: 2}}'), "
                              f"got a list") from None
        cfg = _merge(cfg, layer, str(path))
    parse_overrides(overrides)  # every item well-formed before any is applied
    for o in overrides:        # one at a time, so a merge error names its item and key
        cfg = _merge(cfg, parse_overrides([o]), f"override {o!r}", o.partition("=")[0].strip())
    _resolve_all(cfg, overrides, [CONF_DIR / "base.yaml", preset_path(preset)])
    if os.environ.get("AVR_STORE") and not any(o.startswith("store.root=") for o in overrides):
        cfg.store.root = os.environ["AVR_STORE"]
    validate(cfg)
    from avr_core.redact import register_env
    register_env(cfg.generator.api_key_env, cfg.eval.judge.api_key_env)   # their values are masked in logs
    OmegaConf.set_readonly(cfg, True)
    return cfg


def validate(cfg: DictConfig) -> None:
    """Range checks the type system cannot express; each error names the key."""
    def need(ok: bool, key: str, msg: str) -> None:
        if not ok:
            raise ConfigError(f"key '{key}': {msg} (got {OmegaConf.select(cfg, key)!r})")

    need(cfg.generator.kind in GENERATORS, "generator.kind", _one_of(GENERATORS))
    check_device_settings(cfg, need)
    need(cfg.scorer.kind in SCORERS, "scorer.kind", _one_of(SCORERS))
    check_required(cfg, "scorer", need)
    need(cfg.flow in ("pipeline", "signal"), "flow", "must be pipeline or signal")
    need(cfg.scale.engine in ("local", "ray"), "scale.engine", "must be local or ray")
    # Ray actors that ask for no GPU see none (tasks/runtime/ray_workers.py, no_gpu_env): a backend that wants
    # one must come with GPUs per actor, or it would silently run on the actors' CPUs.
    gpu_wanted = [k for k in ("generator", "scorer") if loads_here(cfg[k])
                  and (str(cfg[k].get("device", "auto")).startswith("cuda") or bool(cfg[k].get("gpus")))]
    need(cfg.scale.engine != "ray" or cfg.scale.gpus_per_worker > 0 or not gpu_wanted, "scale.gpus_per_worker",
         f"must be > 0 with scale.engine=ray when {' and '.join(gpu_wanted) or 'a backend'} asks for a GPU "
         f"(device cuda or gpus); Ray actors without GPUs see none")
    check_ray_actor_gpus(cfg, need)
    check_required(cfg, "generator", need)
    for stage in ("respond", "critique", "refine", "tts", "thought", "eval"):
        s = f"{stage}.sampling"
        need(0.0 <= cfg[stage].sampling.temperature <= 2.0, f"{s}.temperature", "must be in [0, 2]")
        need(0.0 < cfg[stage].sampling.top_p <= 1.0, f"{s}.top_p", "must be in (0, 1]")
        cap = cfg[stage].sampling.max_new_tokens           # null = up to the model's context
        need(cap is None or cap > 0, f"{s}.max_new_tokens", "must be > 0 or null (up to the context)")
    need(cfg.refine.conversation_judge in ("sampling", "refine"), "refine.conversation_judge",
         "must be sampling (ours) or refine (the authors' individual_refine text)")
    need(cfg.select.ties in ("first", "authors"), "select.ties", "must be first or authors")
    need(cfg.select.rsft_judge in ("dpo", "sft"), "select.rsft_judge", "must be dpo or sft")
    need(cfg.critique.k >= 1, "critique.k", "must be >= 1")
    need(cfg.critique.max_tries >= 1, "critique.max_tries", "must be >= 1")
    need(cfg.refine.m >= 1, "refine.m", "must be >= 1")
    need(cfg.shard_size >= 1, "shard_size", "must be >= 1")
    need(cfg.generator.batch_size >= 1, "generator.batch_size", "must be >= 1")
    need(cfg.generator.down_budget_s > 0, "generator.down_budget_s", "must be > 0 (seconds)")
    need(cfg.scorer.batch_size >= 1, "scorer.batch_size", "must be >= 1")
    need(bool(cfg.policy.path), "policy.path", "a model path is required")
    need(bool(cfg.scorer.model.path), "scorer.model.path", "a model path is required")
    for name in ("stage1_sft", "stage1_po", "stage2", "stage2_po", "heldout"):
        sl = cfg.data[name]
        open_end = name.startswith("stage1") and len(sl) == 2 and sl[1] is None   # to the end of the file
        need(len(sl) == 2 and isinstance(sl[0], int) and 0 <= sl[0]
             and (open_end or (isinstance(sl[1], int) and sl[0] <= sl[1])), f"data.{name}",
             "must be [start, stop] with 0 <= start <= stop"
             + (" (stop may be null)" if name.startswith("stage1") else ""))
    sl = cfg.data.heldout_extra
    need(len(sl) == 0 or (len(sl) == 2 and all(isinstance(x, int) for x in sl) and 0 <= sl[0] < sl[1]),
         "data.heldout_extra", "must be [] or [start, stop] with 0 <= start < stop")
    need(bool(cfg.data.prompts), "data.prompts", "a prompt file is required")
    need(cfg.search.k >= 1 and cfg.search.m >= 1, "search.k", "search.k and search.m must be >= 1")
    need(1 <= cfg.search.max_rounds <= 10, "search.max_rounds", "must be in 1..10")
    need(0 <= cfg.tts.rounds <= 5, "tts.rounds", "must be in 0..5")
    need(0 <= cfg.eval.rounds <= 5, "eval.rounds", "must be in 0..5")
    sl = cfg.eval.slice
    need(len(sl) == 2 and all(isinstance(v, int) for v in sl) and 0 <= sl[0] < sl[1], "eval.slice",
         "must be [start, stop] with 0 <= start < stop")
    need(set(cfg.eval.models) <= {"seed", "rsft", "stage1", "stage2"}, "eval.models",
         "items must be seed, rsft, stage1 or stage2")
    need(cfg.eval.judge.kind in ("openai", "local"), "eval.judge.kind", "must be openai or local")
    # the cron expression and time zone themselves are checked by Prefect's own schedule model
    # (run_records/preflight.py check_schedule), the parser that will run them
    need(len(cfg.schedule.cron.split()) == 5, "schedule.cron", "must be a 5-field cron string, e.g. '0 2 * * *'")
    need(cfg.iterate.count >= 1, "iterate.count", "must be >= 1")
    need(cfg.iterate.model in ("stage1", "stage2"), "iterate.model", "must be stage1 or stage2")
    need(cfg.schedule.flow in SCHEDULED_FLOWS, "schedule.flow", _one_of(SCHEDULED_FLOWS))
    need(cfg.schedule.max_runs >= 1, "schedule.max_runs", "must be >= 1")
    need(cfg.schedule.zombie_after_s >= 60, "schedule.zombie_after_s", "must be >= 60 (heartbeats are >= 30 s apart)")
    need(cfg.iterate.prompt_stride >= 0, "iterate.prompt_stride", "must be >= 0 (0: the training slices' span)")
    need(cfg.scale.engine in ("local", "ray"), "scale.engine", "must be local or ray")
    need(cfg.scale.workers >= 1, "scale.workers", "must be >= 1")
    need(cfg.scale.retries >= 0 and cfg.scale.max_restarts >= 0, "scale.retries", "retries and max_restarts >= 0")
    need(cfg.scale.num_nodes >= 0, "scale.num_nodes", "must be >= 0 (0: every node of scale.hostfile)")
    need(cfg.store.lease_s > 0, "store.lease_s", "must be > 0 (seconds)")
    need(cfg.store.stall_s >= 0, "store.stall_s", "must be >= 0 (seconds; 0: never give up the lease)")
    need(cfg.eval.position_bias_n >= 0, "eval.position_bias_n", "must be >= 0")
    need(cfg.eval.lc_min_annotations >= 0, "eval.lc_min_annotations", "must be >= 0")
    need(cfg.scorer.over_long in ("truncate", "skip"), "scorer.over_long", "must be truncate or skip")
    need(cfg.scorer.model.dtype in ("auto", "float32", "bfloat16", "float16"), "scorer.model.dtype",
         "must be auto (bfloat16 on a GPU, float32 on the CPU), float32, bfloat16 or float16")
    if cfg.scorer.over_long != "truncate" and not backend_class(cfg.scorer.kind).takes_over_long:
        need(False, "scorer.over_long", f"skip is for reward models (scorer.kind "
             f"{' or '.join(_kinds(SCORERS, 'takes_over_long'))}); the others read no token limit")
    need(cfg.thought.s >= 2, "thought.s", "must be >= 2 (pairs need two samples)")
    need(cfg.thought.length_rule in ("pick", "drop"), "thought.length_rule", "must be pick or drop")
    need(cfg.search.start in ("respond", "dataset"), "search.start", "must be respond or dataset")
    for sec in ("thought", "eval"):
        need(cfg[sec].extract in ("ours", "authors"), f"{sec}.extract", "must be ours or authors")
        need(cfg[sec].final_answer_tries >= 1, f"{sec}.final_answer_tries", "must be >= 1")
    need(cfg.eval.references in ("file", "hub"), "eval.references", "must be file or hub")
    for t in ("rsft", "po", "cot_sft", "cot_po"):
        need(cfg[t].loss in LOSSES, f"{t}.loss", _one_of(LOSSES))
        need(cfg[t].lr > 0, f"{t}.lr", "must be > 0")
        need(cfg[t].micro_batch_size >= 1, f"{t}.micro_batch_size", "must be >= 1")
        need(cfg[t].ref_batch_size >= 1, f"{t}.ref_batch_size", "must be >= 1")
        need(cfg[t].grad_accum >= 1, f"{t}.grad_accum", "must be >= 1")
        need(cfg[t].zero_stage in (0, 1, 2, 3), f"{t}.zero_stage", "must be 0..3")
        need(cfg[t].max_length > 0, f"{t}.max_length", "must be > 0")
    check_no_secrets(cfg)


def _kinds(registry: dict, fact: str) -> list[str]:
    """The kinds of `registry` whose class has `fact` (a message names them)."""
    return [k for k in registry if getattr(backend_class(k), fact)]


def check_required(cfg: DictConfig, role: str, need) -> None:
    """The keys the `role` section's kind cannot run without (its class's `required`)."""
    kind = cfg[role].kind
    for key, what in backend_class(kind).required.items():
        need(bool(cfg[role][key]), f"{role}.{key}", f"required when {role}.kind={kind}" + (f": {what}" if what else ""))


def loads_here(sec: DictConfig) -> bool:
    """Whether a generator/scorer section loads a model in our processes (its device and GPU
    settings mean something): not an HTTP client, not the model-free rules scorer."""
    cls = backend_class(sec.kind)
    return cls.needs_model and not cls.served_elsewhere(sec)


def check_device_settings(cfg: DictConfig, need) -> None:
    """The form of every device setting (whether this machine has that device: preflight)."""
    from avr_core.backends.device import DeviceError, parse_device

    for key in ("generator", "scorer", "eval.judge", "rsft", "po", "cot_sft", "cot_po"):
        try:
            parse_device(OmegaConf.select(cfg, f"{key}.device"))
        except DeviceError:
            need(False, f"{key}.device", "must be auto, cpu, cuda or cuda:N")
    for key in ("generator", "scorer"):
        need(cfg[key].tensor_parallel_size >= 1, f"{key}.tensor_parallel_size", "must be >= 1")
        need(cfg[key].data_parallel_size >= 0, f"{key}.data_parallel_size", "must be >= 0 (0: every allowed GPU)")
        need(all(isinstance(g, int) and g >= 0 for g in cfg[key].gpus), f"{key}.gpus",
             "must be a list of GPU indices, e.g. [0, 1, 2, 3]")


def check_ray_actor_gpus(cfg: DictConfig, need) -> None:
    """With scale.engine=ray a backend's engines start inside one Ray actor, which sees only its
    own ceil(scale.gpus_per_worker) GPUs, numbered from 0: the `gpus` lists and the engines'
    tensor_parallel_size x data_parallel_size must fit that, or the actor fails at its first shard
    (review F7: "gpus [0..5] name devices [1..5], but only 1 is visible")."""
    import math

    if cfg.scale.engine != "ray" or cfg.scale.gpus_per_worker <= 0:
        return          # no GPU per actor: the rule above refuses a backend that wants one
    have = math.ceil(cfg.scale.gpus_per_worker)
    for needs, why in actor_gpu_needs(cfg):
        need(needs <= have, "scale.gpus_per_worker",
             f"{why} needs {needs} GPUs inside one Ray actor, but each actor gets {have}; "
             f"set scale.gpus_per_worker={needs}")


def actor_gpu_needs(cfg: DictConfig) -> list[tuple[int, str]]:
    """(GPUs one actor needs, why) for each backend that runs on GPUs in a Ray actor:
    enough devices for the highest index in its `gpus` list, and for its vLLM engines' sizes
    (data_parallel_size 0: one engine's worth at least)."""
    out = []
    for name in ("generator", "scorer"):
        sec = cfg[name]
        if not loads_here(sec) or sec.device == "cpu":
            continue
        gpus, tp, dp = list(sec.gpus), sec.tensor_parallel_size, sec.data_parallel_size
        by_list = max(gpus) + 1 if gpus else 0
        by_size = backend_class(sec.kind).gpu_slots(sec)
        why = (f"{name}.gpus {gpus}" if by_list >= by_size
               else f"{name}.tensor_parallel_size {tp} x data_parallel_size {dp}")
        out.append((max(by_list, by_size), why))
    return out


def check_no_secrets(cfg: DictConfig) -> None:
    """Every run saves its resolved config (runs/<id>/config.yaml, each manifest's `config`,
    Prefect's flow-run parameters), so a key must never be IN it: the config names the variable
    that holds the key (`*.api_key_env`), and a value that is (or contains) a secret -- the value
    of a key variable, `sk-...`, `Bearer ...`, a password in a URL -- is refused. The error names
    the key, never the value."""
    from avr_core.redact import ENV_NAME, redact

    for key in ("generator.api_key_env", "eval.judge.api_key_env"):
        if not ENV_NAME.match(str(OmegaConf.select(cfg, key) or "")):
            raise ConfigError(f"key '{key}': must be the NAME of an environment variable holding the key "
                              "(e.g. OPENAI_API_KEY), never the key itself")
    names = (cfg.generator.api_key_env, cfg.eval.judge.api_key_env)
    try:
        flat = OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as e:
        raise ConfigError(f"config: {redact(_first_line(e), names)}") from None

    def walk(node, path):
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{path}.{k}" if path else str(k))
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, f"{path}[{i}]")
        elif isinstance(node, str) and redact(node, names) != node:
            raise ConfigError(f"key '{path}': holds a secret (an API key, token or password); put it in an "
                              "environment variable and name that variable (e.g. eval.judge.api_key_env) "
                              "-- the resolved config is saved with every run")
    walk(flat, "")


def resolve_max_new_tokens(cap: int | None, generator: dict) -> int | None:
    """A stage's `max_new_tokens` as the generator should get it. null means "up to the model's
    context" (the authors set no `max_tokens`): vLLM (`max_tokens=None`) and an OpenAI-compatible
    server (`"max_tokens": null`) already stop at the context, so None passes through; the hf
    backend needs a number, the context length `generator.max_model_len`.

    >>> resolve_max_new_tokens(None, {"kind": "hf", "max_model_len": 4096})
    4096
    >>> resolve_max_new_tokens(None, {"kind": "vllm", "max_model_len": 8192}) is None
    True
    >>> resolve_max_new_tokens(64, {"kind": "hf", "max_model_len": 4096})
    64
    """
    if cap is not None:
        return cap
    return int(generator["max_model_len"]) if backend_class(generator.get("kind", "hf")).needs_token_cap else None


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)


def section(cfg: DictConfig, *keys: str) -> dict:
    """Plain dict of some top-level sections: what a stage's cache key hashes."""
    return {k: OmegaConf.to_container(cfg[k], resolve=True) if OmegaConf.is_config(cfg[k]) else cfg[k]
            for k in keys}
