"""`avr chat`: answer prompts with a model, a Stage-1 model with R critique/refine rounds or a
Stage-2 model with one long thought (avr_core/inference.py), optionally with every step shown."""
from __future__ import annotations

import os
import sys


def add_parser(subparsers) -> None:
    c = subparsers.add_parser("chat", help="answer a prompt with a model (Stage-1: R refinement rounds; "
                                           "Stage-2: a thought)")
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


def run(args) -> int:
    # tqdm reads TQDM_DISABLE when first imported (below): no progress bar runs into the answer or trace
    os.environ.setdefault("TQDM_DISABLE", "1")
    from avr_core.model_refs import model_ref_problem

    if problem := model_ref_problem(args.model):   # before loading anything
        print(f"avr: error: --model {args.model}: {problem}", file=sys.stderr)
        return 2
    from avr_core.backends.base import SamplingParams
    from avr_core.backends.device import size_cpu_threads
    from avr_core.backends.hf import HFGenerator
    from avr_core.inference import answer_prompts
    from avr_core.model_refs import resolve_model_path

    if not 0 <= args.rounds <= 5:
        print("avr: error: --rounds must be in 0..5", file=sys.stderr)
        return 2
    size_cpu_threads()         # AVR_THREADS or this process's cores
    try:
        gen = HFGenerator(resolve_model_path(args.model))
    except OSError as e:   # e.g. a hub id that is not in the local cache (HF_HUB_OFFLINE)
        from avr_core.hub import mode_line
        print(f"avr: error: --model {args.model}: cannot load: {str(e).splitlines()[0]}; {mode_line()}",
              file=sys.stderr)
        return 2
    prompts = [args.prompt] if args.prompt else [line.strip() for line in sys.stdin if line.strip()]
    params = SamplingParams(n=1, temperature=0.0, max_new_tokens=args.max_new_tokens)
    mode = "thought" if args.thought else "refine"
    plain = not (args.show_trace or args.thought or args.rounds)     # the answer is the only generation
    for q in prompts:   # one at a time, each streamed as it is generated
        # the trace and a plain answer stream to stdout; the steps of a longer answer stream to
        # stderr (progress), and stdout gets the final answer alone
        live = stream_to(gen, sys.stdout if args.show_trace or plain else sys.stderr,
                         None if plain else step_labels(args.thought, args.rounds))
        try:
            out = answer_prompts([[{"role": "user", "content": q}]], gen, mode, args.rounds, params)[0]
        finally:
            stream_to(gen, None)
        if args.show_trace:
            print(f"--- final answer ({out['path']}) ---\n{out['answer']}" if live else trace_text(out, args.thought))
        elif not (plain and live):
            print(out["answer"])
    return 0


def step_labels(thought: bool, rounds: int) -> list[str]:
    """The generations of one answer, in the order `answer_prompts` makes them."""
    if thought:
        return ["thought"]
    return ["first answer", *[f"round {i} {s}" for i in range(1, rounds + 1) for s in ("critique", "refinement")]]


def stream_to(gen, out, labels: list[str] | None = None) -> bool:
    """Stream `gen`'s generations to `out` as they are made, each under the next of `labels` (None:
    unlabelled); `out` None stops streaming. False: this generator cannot stream (it prints at the end)."""
    if not hasattr(gen, "streamer"):
        return False
    gen.streamer = None if out is None else _labelled_streamer(gen.tok, out, labels)
    return True


def _labelled_streamer(tok, out, labels):
    from transformers import TextStreamer

    class Labelled(TextStreamer):
        """transformers' TextStreamer writing to `out`, a label line before each generation."""

        def __init__(self):
            super().__init__(tok, skip_prompt=True, skip_special_tokens=True)
            self.labels = iter(labels or ())

        def put(self, value):
            if self.next_tokens_are_prompt and (label := next(self.labels, None)):   # a generation starts
                out.write(f"--- {label} ---\n")
            super().put(value)

        def on_finalized_text(self, text: str, stream_end: bool = False):
            out.write(text + ("\n" if stream_end else ""))
            out.flush()
    return Labelled()


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
