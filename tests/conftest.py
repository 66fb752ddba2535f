"""Fixtures shared by the test folders: NaN-poisoned allocations and the effective slots of
a kernel test case. The Triton interpreter is chosen here, before anything imports triton
(tests/gpu run on a GPU machine without it: there it is never set)."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def e4m3_cast(monkeypatch):
    """The interpreter's fp32/fp16 -> e4m3 cast rounded as on the GPU, for this test only
    (``moelora_dist/testing/interpreter.py`` says what is wrong with it)."""
    from moelora_dist.testing.interpreter import fix_e4m3_cast

    fix_e4m3_cast(monkeypatch.setattr)


@pytest.fixture
def poisoned_allocations(monkeypatch):
    """Fresh torch.empty / empty_like memory is NaN (or a huge int) so that a kernel that
    leaves part of its output unwritten fails loudly instead of passing by luck."""
    from moelora_dist.testing.kernel_cases import poison_

    empty, empty_like = torch.empty, torch.empty_like
    monkeypatch.setattr(torch, "empty", lambda *a, **k: poison_(empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: poison_(empty_like(*a, **k)))


def effective_slots(c) -> torch.Tensor:
    """What the batch info hands the layer for kernel case ``c``: disabled or rank-0 slots
    become -1 (the references take these; the kernels take the raw slots + enabled flags)."""
    s = c["token_slot_T"].long()
    lora = c["lora"]
    ok = (s >= 0) & c["slot_enabled_S"][s.clamp(min=0)] & (lora.slot_rank[s.clamp(min=0)] > 0)
    return torch.where(ok, s, -1).to(torch.int32)


@pytest.fixture(name="effective_slots")
def effective_slots_fixture():
    return effective_slots
