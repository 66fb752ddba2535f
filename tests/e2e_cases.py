"""End-to-end cases shared by the model-runner tests: a tiny HF MoE model on disk, two real PEFT
adapters, a mixed batch of requests, and the transformers+PEFT reference run one request at a
time (PEFT cannot mix adapters in one batch on expert parameters).

    case = build_case("qwen3_moe", tmp_path)
    ref = hf_logits(case, REQUESTS)          # list of [L, V] fp32 tensors

Adapter ``a1``: rank 4, alpha 8, on q/k/v/o and every expert parameter. Adapter ``a2``: rank 8,
alpha 4, rsLoRA (scale alpha / sqrt(r)), on q/v and the experts (plus the dense MLP of hybrid
models, see :func:`add_dense_mlp_lora`). Both have random ``lora_B`` (PEFT's zero init would make them no-ops).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tests.hf_factory import (ATTENTION_MODULES, EXPERT_PARAMETERS, make_model,
                              make_peft_adapter, moe_block, save_model)

# (input_ids, adapter) of a batch mixing both adapters and base-only requests, of different
# lengths; token ids stay below the tiny vocabulary of 128.
REQUESTS = [
    ([3, 4, 5, 6, 7], "a1"),
    ([9, 10], None),
    ([11, 12, 13, 14, 15, 16, 17, 18, 19], "a2"),
    ([20, 21, 22], "a1"),
    ([30], "a2"),
    ([40, 41, 42, 43], None),
]
GEN_REQUESTS = [([3, 4, 5], "a2", 5), ([7, 8, 9, 10, 11], "a1", 4), ([50, 51], None, 3)]

# Hybrid Qwen3-MoE: layer 1 is a dense SwiGLU MLP (mlp_only_layers), layer 0 and 2 are MoE.
HYBRID = dict(num_hidden_layers=3, mlp_only_layers=[1])
DENSE_LAYER = 1


@dataclass
class Case:
    arch: str
    model_dir: Path
    adapter_dirs: dict[str, Path]
    hf: dict = field(default_factory=dict)  # adapter name or None -> HF (PEFT) model

    def adapter_args(self) -> list[str]:
        out = []
        for name, path in self.adapter_dirs.items():
            out += ["--adapter", f"{name}={path}"]
        return out


def build_case(arch: str, root: Path, *, seed: int = 0, hybrid: bool = False) -> Case:
    """Save a tiny model and two adapters under ``root``; keep the HF models for reference."""
    overrides = dict(HYBRID) if hybrid else {}
    root = Path(root)
    model_dir = save_model(make_model(arch, seed=seed, **overrides), root / "model")
    p1 = make_peft_adapter(make_model(arch, seed=seed, **overrides), root / "a1", r=4, alpha=8,
                           target_modules=ATTENTION_MODULES,
                           target_parameters=EXPERT_PARAMETERS, seed=seed + 1)
    p2 = make_peft_adapter(make_model(arch, seed=seed, **overrides), root / "a2", r=8, alpha=4,
                           target_modules=["q_proj", "v_proj"],
                           target_parameters=EXPERT_PARAMETERS, use_rslora=True,
                           seed=seed + 2)
    if hybrid:
        add_dense_mlp_lora(p2, root / "a2", r=8, alpha=4, rslora=True, seed=seed + 3)
    base = make_model(arch, seed=seed, **overrides)
    return Case(arch, model_dir, {"a1": root / "a1", "a2": root / "a2"},
                {None: base, "a1": p1, "a2": p2})


@torch.no_grad()
def add_dense_mlp_lora(peft_model, adapter_dir: Path, *, r: int, alpha: float, rslora: bool,
                       seed: int, layer: int = DENSE_LAYER) -> None:
    """Give a saved adapter LoRA on the dense MLP of ``layer``, in PEFT's key format, and merge
    the same deltas into ``peft_model``'s base weights so that it stays the reference.

    Why by hand: PEFT 0.21 rewrites target names ``gate_proj``/``up_proj``/``down_proj`` (even
    inside a regex) into the fused expert parameters of transformers-5 Qwen3-MoE, so it cannot
    target the dense MLP of a hybrid model. The reference is then merged weights
    ``W + scale * B @ A``, the definition of LoRA.
    """
    from safetensors.torch import load_file, save_file

    gen = torch.Generator().manual_seed(seed)
    scale = alpha / (r ** 0.5 if rslora else r)
    path = adapter_dir / "adapter_model.safetensors"
    tensors = load_file(str(path))
    mlp = moe_block(peft_model, layer)
    for name in ("gate_proj", "up_proj", "down_proj"):
        w = getattr(mlp, name).weight
        a = torch.randn(r, w.shape[1], generator=gen) * 0.2
        b = torch.randn(w.shape[0], r, generator=gen) * 0.2
        key = f"base_model.model.model.layers.{layer}.mlp.{name}"
        tensors[f"{key}.lora_A.weight"], tensors[f"{key}.lora_B.weight"] = a, b
        w += scale * (b @ a)
    save_file(tensors, str(path), metadata={"format": "pt"})


@torch.no_grad()
def hf_logits(case: Case, requests=REQUESTS) -> list[torch.Tensor]:
    """transformers+PEFT logits, one request at a time with the matching adapter."""
    return [case.hf[a](input_ids=torch.tensor([ids])).logits[0].float() for ids, a in requests]


@torch.no_grad()
def hf_generate(case: Case, requests=GEN_REQUESTS) -> list[list[int]]:
    """HF greedy ``generate`` (new tokens only), one request at a time."""
    out = []
    for ids, a, n in requests:
        seq = case.hf[a].generate(input_ids=torch.tensor([ids]), max_new_tokens=n,
                                  do_sample=False)
        out.append(seq[0, len(ids):].tolist())
    return out


def write_requests(path: Path, requests=REQUESTS) -> Path:
    with open(path, "w") as f:
        for r in requests:
            obj = {"input_ids": r[0], "adapter": r[1]}
            if len(r) > 2:
                obj["max_new_tokens"] = r[2]
            f.write(json.dumps(obj) + "\n")
    return path
