"""The base MoE block: one rank's slice of a MoE layer's weights, and its routing.

Legend: T tokens, H hidden, E experts, E_l local experts, I intermediate, I_l local
intermediate, X = 2 I_l (the rank's gate rows, then its up rows), K top-k.

``MoEBlock`` holds the router ``[E, H]`` replicated, gate and up rows ``[E_l, X, H]`` and down
columns ``[E_l, H, I_l]`` (docs/design.md, the rank layout). It has no LoRA and no collective;
:class:`moelora_dist.moe.layer.LoRAMoE` wraps it.

Family variants (``moelora_dist/config/families.py``): the router (:class:`RouterSpec`; a
router bias for gpt-oss, a selection-only correction bias for DeepSeek-V3 / GLM-4.5, whose
router also runs in fp32), expert biases (gpt-oss; ``b_down`` is kept by the rank holding
the first ``I`` slice only, so the MoE-TP sum adds it once) and the activation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moelora_dist.kernels.constants import Activation, as_activation
from moelora_dist.kernels.weights_fp8 import is_fp8
from moelora_dist.moe.experts import pick_backend, run_experts
from moelora_dist.moe.router import RouterSpec, localize_topk_ids, route_with
from moelora_dist.parallel.layout import MoEShard
from moelora_dist.parallel.sharding import cut_gate_up


def _frozen(t: torch.Tensor | None):
    return None if t is None else nn.Parameter(t, requires_grad=False)


class MoEBlock(nn.Module):
    """Base MoE layer holding one rank's slice of the expert weights (no LoRA, no collectives).

    ``router_EH [E, H]``, ``w_gate_up [E_l, 2*I_l, H]``, ``w_down [E_l, H, I_l]``: tensors, or
    :class:`~moelora_dist.kernels.weights_fp8.BlockFP8Weight` for FP8 experts; optional
    ``router_bias_E [E]``, ``correction_bias_E [E]`` (fp32), ``b_gate_up [E_l, 2*I_l]`` and
    ``b_down [E_l, H]`` (given on every rank; kept only where ``shard.i_start == 0``).
    ``router_fp32``: logits computed in fp32 from an fp32 router weight (DeepSeek-V3, GLM).
    """

    def __init__(self, router_EH: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor,
                 *, top_k: int, renormalize: bool, shard: MoEShard,
                 activation: "str | Activation" = "silu", router: RouterSpec | None = None,
                 router_bias_E: torch.Tensor | None = None,
                 correction_bias_E: torch.Tensor | None = None,
                 b_gate_up: torch.Tensor | None = None, b_down: torch.Tensor | None = None,
                 router_fp32: bool = False):
        super().__init__()
        E, H = router_EH.shape
        act = as_activation(activation)
        if E != shard.num_experts:
            raise ValueError(f"router has {E} experts but the shard says {shard.num_experts}")
        want_gu = (shard.num_local_experts, 2 * shard.i_local, H)
        want_d = (shard.num_local_experts, H, shard.i_local)
        if tuple(w_gate_up.shape) != want_gu or tuple(w_down.shape) != want_d:
            raise ValueError(f"rank-local weights have shapes gate_up {tuple(w_gate_up.shape)}, "
                             f"down {tuple(w_down.shape)}; expected {want_gu} and {want_d}")
        if not 0 < top_k <= E:
            raise ValueError(f"top_k={top_k} must be in [1, {E}]")
        spec = router or RouterSpec(top_k, "softmax", renormalize)
        if spec.kind == "sigmoid_grouped" and correction_bias_E is None:
            raise ValueError("the sigmoid_grouped router needs its correction bias [E]")
        for name, t, shape in (("b_gate_up", b_gate_up, want_gu[:2]),
                               ("b_down", b_down, (shard.num_local_experts, H))):
            if t is not None and tuple(t.shape) != shape:
                raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {shape}")
        self.router = nn.Parameter(router_EH.float() if router_fp32 else router_EH,
                                   requires_grad=False)
        # FP8 experts (a BlockFP8Weight: e4m3 values + block scales) are kept as they are.
        self.w_gate_up = w_gate_up if is_fp8(w_gate_up) else nn.Parameter(w_gate_up,
                                                                           requires_grad=False)
        self.w_down = w_down if is_fp8(w_down) else nn.Parameter(w_down, requires_grad=False)
        self.router_bias = _frozen(router_bias_E)
        self.correction_bias = _frozen(None if correction_bias_E is None
                                       else correction_bias_E.float())
        self.b_gate_up = _frozen(b_gate_up)
        # The down bias rides on the MoE-TP partial sums: one rank of the group adds it.
        self.b_down = _frozen(b_down if shard.i_start == 0 else None)
        self.top_k = top_k
        self.renormalize = renormalize
        self.activation = act if act.name == "swiglu_oai" else act.name
        self.router_spec = spec
        self.router_fp32 = router_fp32
        self.shard = shard

    @classmethod
    def from_full(cls, router_EH: torch.Tensor, w_gate_up_EXH: torch.Tensor,
                  w_down_EHI: torch.Tensor, *, top_k: int, renormalize: bool, shard: MoEShard,
                  activation: "str | Activation" = "silu", b_gate_up_EX: torch.Tensor | None = None,
                  b_down_EH: torch.Tensor | None = None, **router_kw) -> "MoEBlock":
        """Cut a rank's slice from full weights ``[E, 2I, H]`` / ``[E, H, I]`` (and biases
        ``[E, 2I]`` / ``[E, H]``).

        Gate rows ``[0, I)`` and up rows ``[I, 2I)`` are sliced *separately* by the shard's
        ``I`` range, so each rank gets matching gate and up rows.
        """
        E, two_i, H = w_gate_up_EXH.shape
        I = two_i // 2
        if I != shard.intermediate or tuple(w_down_EHI.shape) != (E, H, I):
            raise ValueError(f"full weights gate_up {tuple(w_gate_up_EXH.shape)} / down "
                             f"{tuple(w_down_EHI.shape)} do not match the shard (E="
                             f"{shard.num_experts}, I={shard.intermediate})")
        experts, i_cols = shard.expert_slice, shard.i_slice
        gate_up = cut_gate_up(w_gate_up_EXH[experts], shard, dim=1)
        down = w_down_EHI[experts, :, i_cols]
        b_gu = None if b_gate_up_EX is None else cut_gate_up(b_gate_up_EX[experts], shard, 1)
        b_d = None if b_down_EH is None else b_down_EH[experts]
        return cls(router_EH.contiguous(), gate_up.contiguous(), down.contiguous(), top_k=top_k,
                   renormalize=renormalize, shard=shard, activation=activation,
                   b_gate_up=None if b_gu is None else b_gu.contiguous(),
                   b_down=None if b_d is None else b_d.contiguous(), **router_kw)

    @property
    def num_experts(self) -> int:
        return self.shard.num_experts

    @property
    def num_local_experts(self) -> int:
        return self.shard.num_local_experts

    @property
    def hidden_size(self) -> int:
        return int(self.router.shape[1])

    @property
    def intermediate_size(self) -> int:
        return self.shard.intermediate

    def router_logits(self, x_TH: torch.Tensor) -> torch.Tensor:
        """``[T, E]`` router logits as transformers computes them for this family: fp32 for
        the grouped router, in ``x``'s dtype (with the bias) otherwise."""
        if self.router_fp32:
            return F.linear(x_TH.float(), self.router)
        bias = None if self.router_bias is None else self.router_bias.to(x_TH.dtype)
        return F.linear(x_TH, self.router.to(x_TH.dtype), bias)

    def route(self, x_TH: torch.Tensor, router_logits_TE: torch.Tensor | None = None):
        """``x_TH [T, H]`` -> ``topk_weights_TK`` fp32, ``topk_ids_TK`` int32 (global ids).
        ``router_logits_TE``: logits computed by the caller (with a router LoRA), else
        :meth:`router_logits`."""
        logits_TE = self.router_logits(x_TH) if router_logits_TE is None else router_logits_TE
        return route_with(self.router_spec, logits_TE, self.correction_bias)

    def expert_biases(self):
        """``(b_gate_up [E_l, X] | None, b_down [E_l, H] | None)`` as the kernels take them."""
        return self.b_gate_up, self.b_down

    def forward(self, x_TH: torch.Tensor, backend: str | None = None) -> torch.Tensor:
        """This rank's partial output ``[T, H]``: its experts, its ``I`` slice, no collective
        and no LoRA. On one process it is the layer's output; over ranks the partials sum to
        it."""
        w_TK, ids_TK = self.route(x_TH)
        local_TK = localize_topk_ids(ids_TK, self.shard.expert_start, self.num_local_experts,
                                     self.shard.num_experts)
        return run_experts(pick_backend(x_TH.device, backend), x_TH, self.w_gate_up,
                           self.w_down, w_TK, local_TK, None, None, self.activation, None, None,
                           *self.expert_biases())
