"""Which path ``MoEBlock.route`` takes: the router GEMM fused with the softmax top-k (one
launch) only for the ``softmax`` router with no bias, a 16-bit ``x`` with a weight of its
dtype, ``1 <= T <= FUSED_GEMM_MAX_TOKENS``, and no logits given (a router LoRA gives them).

On CPU the Triton router family is made to apply (``_topk_kernels`` returns the Triton ops,
which run under the interpreter) and a spy on ``gemm_softmax_topk`` records whether the fused
launch ran. fp16 inputs that are multiples of 1/64 (exact products and sums, module docstring
of ``test_kernels_router_gemm``): both paths give the same logits, so ids must be equal.
"""

import types

import pytest
import torch
import torch.nn.functional as F

from moelora_dist.kernels.router import ops
from moelora_dist.models.model import MoELoRAModel
from moelora_dist.moe import router
from moelora_dist.moe.block import MoEBlock
from moelora_dist.moe.router import RouterSpec
from moelora_dist.parallel.layout import Layout

E, H, I, K = 16, 64, 8, 4


@pytest.fixture
def fused_calls(monkeypatch):
    """Token counts of every fused launch while the Triton router family applies."""
    calls = []
    real = ops.gemm_softmax_topk

    def spy(x_TH, *args, **kwargs):
        calls.append(x_TH.shape[0])
        return real(x_TH, *args, **kwargs)

    monkeypatch.setattr(ops, "gemm_softmax_topk", spy)
    monkeypatch.setattr(router, "_topk_kernels", lambda t: ops)
    return calls


def _exact(shape, g, dtype=torch.float16):
    return (torch.randint(-64, 65, shape, generator=g) / 64).to(dtype)


def _block(dtype=torch.float16, **kw):
    g = torch.Generator().manual_seed(0)
    return MoEBlock(_exact((E, H), g, dtype), _exact((E, 2 * I, H), g, dtype),
                    _exact((E, H, I), g, dtype), top_k=K, renormalize=True,
                    shard=Layout(1, 1).moe_shard(0, E, I), **kw)


def _x(T, dtype=torch.float16, seed=1):
    return _exact((T, H), torch.Generator().manual_seed(seed), dtype)


def _unfused(block, x, logits=None):
    logits = block.router_logits(x) if logits is None else logits
    return router.route_with(block.router_spec, logits, block.correction_bias)


def _same(got, want):
    assert torch.equal(got[1], want[1])
    torch.testing.assert_close(got[0], want[0], rtol=2e-6, atol=1e-7)


@pytest.mark.parametrize("T", [1, 9, 64])
def test_decode_sizes_take_the_fused_launch(fused_calls, T):
    block, x = _block(), _x(T)
    got = block.route(x)
    assert fused_calls == [T]
    _same(got, _unfused(block, x))


def test_above_the_constant_or_with_it_at_zero_the_gemm_runs_apart(fused_calls, monkeypatch):
    block = _block()
    _same(block.route(_x(65)), _unfused(block, _x(65)))
    monkeypatch.setattr(ops, "FUSED_GEMM_MAX_TOKENS", 4)  # read at every call
    block.route(_x(5))
    block.route(_x(4))
    monkeypatch.setattr(ops, "FUSED_GEMM_MAX_TOKENS", 0)
    block.route(_x(1))
    assert fused_calls == [4]


def test_given_logits_are_routed_as_given(fused_calls):
    block, x = _block(), _x(5)
    logits = block.router_logits(x) + torch.arange(E, dtype=x.dtype)  # as if a LoRA moved them
    got = block.route(x, logits)
    assert fused_calls == []
    _same(got, _unfused(block, x, logits))


@pytest.mark.parametrize("kw,dtype", [
    (dict(router_bias_E=torch.ones(E, dtype=torch.float16)), torch.float16),  # the GEMM's bias
    (dict(router=RouterSpec(K, "topk_softmax")), torch.float16),  # another router
    (dict(router_fp32=True, router=RouterSpec(K, "softmax", True)), torch.float16),
    (dict(), torch.float32),  # fp32 activations
], ids=["router_bias", "topk_softmax", "router_fp32", "fp32"])
def test_other_routers_and_dtypes_keep_the_gemm_apart(fused_calls, kw, dtype):
    block, x = _block(dtype, **kw), _x(5, dtype)
    _same(block.route(x), _unfused(block, x))
    assert fused_calls == []


def test_off_cuda_the_reference_runs():
    block, x = _block(), _x(5)
    assert not router.fused_gemm_applies(x, block.router)
    _same(block.route(x), _unfused(block, x))


class _Moe:
    """A MoE layer that returns its block's routing of the logits it is handed."""

    def __init__(self, base):
        self.base = base

    def __call__(self, x_TH, batch_info, router_logits_TE):
        return self.base.route(x_TH, router_logits_TE)


@pytest.mark.parametrize("router_lora", [True, False])
def test_the_model_hands_the_router_lora_logits_to_the_block(fused_calls, router_lora):
    """``MoELoRAModel._moe`` with a LoRA batch: with the router LoRA on, it computes the
    logits plus the LoRA delta and the block routes those (no fused launch); with it off, the
    block routes from ``x`` (fused)."""
    block, x = _block(), _x(6)
    delta = torch.linspace(-3, 3, E, dtype=x.dtype)
    lora = types.SimpleNamespace(apply=lambda logits, x_TH, path: logits + delta)
    model = types.SimpleNamespace(pool=None)
    layer = {"moe": _Moe(block), "router_path": "layers.0.mlp.gate"}
    got = MoELoRAModel._moe(model, layer, x, None, lora, router_lora)
    if router_lora:
        assert fused_calls == []
        _same(got, _unfused(block, x, F.linear(x, block.router) + delta))
    else:
        assert fused_calls == [6]
        _same(got, _unfused(block, x))
