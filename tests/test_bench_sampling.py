"""bench/sampling.py --engine stages: the arithmetic and the patterns' requests, without a model
(the real run is `.venv/bin/python bench/sampling.py --engine stages`)."""
from __future__ import annotations

import json
import struct
import sys
from argparse import Namespace
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import stages  # noqa: E402  (bench/ is a scripts folder, not a package)

from avr_core.synthesis import Sampling  # noqa: E402
from tests.fakes import FakeGenerator  # noqa: E402


def test_count_params_reads_safetensors_headers(tmp_path):
    header = json.dumps({"__metadata__": {"format": "pt"},
                         "a": {"dtype": "F32", "shape": [3, 4], "data_offsets": [0, 48]},
                         "b": {"dtype": "F32", "shape": [5], "data_offsets": [48, 68]}}).encode()
    (tmp_path / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + bytes(68))
    assert stages.count_params(str(tmp_path)) == 17


def test_authors_pattern_sends_one_n1_request_per_sample():
    gen, convs = FakeGenerator(), [[{"role": "user", "content": "x"}], [{"role": "user", "content": "y"}]]
    sampling = Sampling(max_new_tokens=8)
    ours = stages.time_round(gen, "vllm", "vllm pipeline", "critique", convs, 3, sampling, salt=1)
    theirs = stages.time_round(gen, "vllm", "authors", "critique", convs, 3, sampling, salt=1)
    assert [(n, p.n) for n, p in gen.calls] == [(2, 3), (6, 1)]      # one call per round either way
    assert (ours.requests, ours.samples) == (2, 6) and (theirs.requests, theirs.samples) == (6, 6)
    assert stages.per_sample(["a", "b"], 2) == ["a", "a", "b", "b"]


def test_ratios_are_per_stage_and_bound_is_fp32():
    rows = [stages.StageRow("vllm", "vllm pipeline", 1, 1, 300, 1.0, stage="refine"),
            stages.StageRow("hf", "hf round-batched", 1, 1, 100, 1.0, stage="refine"),
            stages.StageRow("vllm", "vllm pipeline", 1, 1, 50, 1.0, stage="respond")]   # no hf row: no ratio
    stages.add_ratios(rows, bound_tps=200.0)
    assert [r.ratio for r in rows] == [3.0, 1.0, None]
    assert [r.of_bound for r in rows] == [1.5, 0.5, 0.25]
    assert "150.0%" in stages.table(rows)


@pytest.mark.parametrize("w, wo, want", [(None, None, "see docs/PERFORMANCE.md"),
                                         (2, 6, "saving 80.0 s per run")])
def test_start_overhead(w, wo, want):
    st = stages.starts(Namespace(starts_with=w, starts_without=wo), {"vllm_start_s": 20.0})
    assert want in stages._starts_line(st)
