"""Releasing accelerator memory never creates a CUDA context (review D1): the Prefect flow process
calls `release_accelerator()` after every stage that closed a backend, and never uses CUDA itself."""
import torch

from avr_core.backends.device import release_accelerator


def test_release_does_not_touch_cuda_in_a_process_that_never_used_it(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)        # a GPU node...
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)     # ...where this process holds no context
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: calls.append("synchronize"))
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: calls.append("empty_cache"))
    release_accelerator()
    assert calls == []
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)      # a process that did load a model
    release_accelerator()
    assert calls == ["empty_cache", "synchronize"]
