"""Inputs, the transformers peer, byte/FLOP counts and the plot of the kernel benchmark."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from benchmarks.kernels import roofline
from moelora_dist.kernels.constants import Activation
from moelora_dist.testing.kernel_cases import make_lora
from moelora_dist.moe.router import (localize_topk_ids, route, route_sigmoid_grouped,
                                     route_topk_softmax)

MODELS = {  # H, E, K, I of the public model configurations, and EP (E / EP local experts)
    "qwen3-30b-a3b": (2048, 128, 8, 768, 1),
    "mixtral-8x7b": (4096, 8, 2, 14336, 1),
    "olmoe": (2048, 64, 8, 1024, 1),
    # DeepSeek-V3 / Kimi-K2 routed experts at EP 8: 32 local experts (the all-reduce
    # dispatcher's view: the other ranks' experts are -1)
    "deepseek-v3-routed": (7168, 256, 8, 2048, 8),
    # --families: the same shape routed by DeepSeek-V3's own router (sigmoid, correction
    # bias, 4 of 8 groups: rank 0's 32 experts are one group, so a token routes to them in
    # about half the batch), and gpt-oss-120b (biased experts, clamped SwiGLU, top-4 of 128).
    "deepseek-v3-grouped": (7168, 256, 8, 2048, 8),
    "gpt-oss-120b": (2880, 128, 4, 2880, 1),
}
GPT_OSS_SWIGLU = Activation("swiglu_oai", 1.702, 7.0)
NUM_SLOTS = 8
_WEIGHTS: dict = {}


@dataclass(frozen=True)
class Case:
    model: str
    T: int
    adapters: int  # 0: no LoRA buffers at all (the base layer)
    rank: int
    share: float  # share of tokens carrying an adapter

    @property
    def name(self) -> str:
        if self.adapters == 0:
            return f"{self.model}/T{self.T}/base"
        return f"{self.model}/T{self.T}/a{self.adapters}r{self.rank}s{self.share:g}"


def make_inputs(case: Case, device="cuda", seed=0):
    """bf16 layer inputs; adapters are contiguous requests, as a serving batch has them."""
    H, E_all, K, I, ep = MODELS[case.model]
    E = E_all // ep
    g = torch.Generator(device=device).manual_seed(seed)
    dev = dict(device=device, dtype=torch.bfloat16)
    x = torch.randn(case.T, H, generator=g, device=device).to(**dev)
    if case.model not in _WEIGHTS:  # one copy per model: the weights do not change per case
        _WEIGHTS.clear()
        _WEIGHTS[case.model] = (
            (torch.randn(E, 2 * I, H, generator=g, device=device) * H ** -0.5).to(**dev),
            (torch.randn(E, H, I, generator=g, device=device) * I ** -0.5).to(**dev))
    w_gu, w_d = _WEIGHTS[case.model]
    logits = torch.randn(case.T, E_all, generator=g, device=device)
    if case.model == "deepseek-v3-grouped":
        bias = torch.randn(E_all, generator=g, device=device) * 0.1
        tw, ids = route_sigmoid_grouped(logits, bias, K, 8, 4, True, 2.5)
    elif case.model.startswith("gpt-oss"):
        tw, ids = route_topk_softmax(logits, K)
    else:
        tw, ids = route(logits, K, renormalize=True)
    ids = localize_topk_ids(ids, 0, E)
    inp = dict(x_TH=x, w_gate_up_EXH=w_gu, w_down_EHI=w_d, topk_weights_TK=tw, topk_ids_TK=ids,
               token_slot_T=None, lora=None, slot_enabled_S=None)
    if case.model.startswith("gpt-oss"):
        inp.update(activation=GPT_OSS_SWIGLU, b_gate_up_EX=(
            torch.randn(E, 2 * I, generator=g, device=device) * 0.1).to(**dev),
            b_down_EH=(torch.randn(E, H, generator=g, device=device) * 0.1).to(**dev))
    if case.adapters == 0:
        return inp
    lora = make_lora(NUM_SLOTS, E, case.rank, H, I, torch.bfloat16, device, g,
                     ranks=[case.rank] * case.adapters + [0] * (NUM_SLOTS - case.adapters))
    n_lora = int(round(case.T * case.share))
    slot = torch.full((case.T,), -1, dtype=torch.int32)
    if n_lora:
        per = math.ceil(n_lora / case.adapters)
        slot[:n_lora] = (torch.arange(n_lora) // per).to(torch.int32)
    enabled = torch.zeros(NUM_SLOTS, dtype=torch.bool)
    enabled[slot[slot >= 0].unique().long()] = True
    # The host-side count a BatchInfo carries; lets the layer skip LoRA with no sync.
    inp.update(token_slot_T=slot.to(device), lora=lora, slot_enabled_S=enabled.to(device),
               num_lora_tokens=n_lora)
    return inp


def touched_weight_bytes(inp) -> int:
    """Bytes of the base expert weights a call must read (experts with >= 1 pair)."""
    return roofline.base_weight_bytes(inp)


def flops(inp) -> float:
    """Base FLOPs of the valid pairs (``roofline.py`` adds the adapters')."""
    return roofline.base_flops(inp)


def variant_kwargs(inp) -> dict:
    """The expert variant of a case (gpt-oss: activation and biases), as reference kwargs."""
    return {k: inp[k] for k in ("activation", "b_gate_up_EX", "b_down_EH") if k in inp}


def make_peer(inp, rank: int | None):
    """transformers' Qwen3MoeSparseMoeBlock (grouped_mm experts) with our weights, optionally
    wrapped with a PEFT ``target_parameters`` LoRA of ``rank`` on both expert parameters."""
    from transformers.models.qwen3_moe.configuration_qwen3_moe import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    E, two_i, H = inp["w_gate_up_EXH"].shape
    K = inp["topk_ids_TK"].shape[1]
    cfg = Qwen3MoeConfig(hidden_size=H, moe_intermediate_size=two_i // 2, num_experts=E,
                         num_experts_per_tok=K, norm_topk_prob=True,
                         experts_implementation="grouped_mm")
    block = Qwen3MoeSparseMoeBlock(cfg).to(device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        block.experts.gate_up_proj.copy_(inp["w_gate_up_EXH"])
        block.experts.down_proj.copy_(inp["w_down_EHI"])
        block.gate.weight.normal_(0, H ** -0.5)
    if rank:
        from peft import LoraConfig, inject_adapter_in_model

        block = inject_adapter_in_model(
            LoraConfig(r=rank, lora_alpha=2 * rank, init_lora_weights=False,
                       target_parameters=["experts.gate_up_proj", "experts.down_proj"]), block)
        block = block.to(device="cuda", dtype=torch.bfloat16)
    x = inp["x_TH"][None]
    return lambda: block(x)


def _ms(r):
    """A row's graph-replay time where measured (the peers' table is graph time), else eager."""
    return r["ms_graph"] if r.get("ms_graph") not in (None, "") else r.get("ms")


def plot(path, rows, meta):
    """Per model: time vs T per configuration (log-log; reference rows of issue 16's table
    dashed) over the share of each case's own roofline."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted({r["model"] for r in rows})
    fig, axes = plt.subplots(2, len(models), figsize=(7 * len(models), 9), squeeze=False,
                             gridspec_kw=dict(height_ratios=[2, 1]))
    for col, model in enumerate(models):
        ax, ax2 = axes[0][col], axes[1][col]
        mine = [r for r in rows if r["model"] == model and r["ok"]]
        for cfg in sorted({r["config"] for r in mine}):
            pts = sorted((r["T"], _ms(r)) for r in mine if r["config"] == cfg)
            ref = cfg.startswith(("peer", "before"))
            ax.plot(*zip(*pts), "--" if ref else "-", marker="x" if ref else "o", label=cfg,
                    alpha=0.6 if ref else 1.0)
            share = sorted((r["T"], r["roofline_pct"]) for r in mine if r["config"] == cfg
                           and r.get("roofline_pct") not in (None, ""))
            if share:
                ax2.plot(*zip(*share), marker="o", label=cfg)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_ylabel("time per MoE layer (ms, median, graph replay)")
        ax.set_title(f"{model} (dashed: issue 16's table, for reference)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=6)
        ax2.set_xscale("log", base=2)
        ax2.set_xlabel("tokens T")
        ax2.set_ylabel("% of own roofline")
        ax2.grid(True, which="both", alpha=0.3)
    fig.suptitle(f"moelora_dist fused MoE + multi-LoRA, {meta['device']}, {meta['utc']} UTC, "
                 f"commit {meta['commit']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def bench(fn) -> float:
    """Median ms of ``fn`` (eager launches), as ``triton.testing.do_bench`` measures it."""
    import triton  # CUDA-only path; the CPU tests import this module without timing

    return triton.testing.do_bench(fn, warmup=10, rep=60, return_mode="median")


def bench_graph(fn) -> float:
    """Median ms of ``fn`` replayed from a CUDA graph: a decode step's cost without the
    Python launch overhead of ~12 Triton launches (the serving loop captures decode)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return bench(graph.replay)
