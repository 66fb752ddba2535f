"""Tiny FP8 checkpoints written in the test, block by block, in the exact Hugging Face layout,
and their transformers+PEFT references.

    case = build_fp8_case("qwen3_moe", tmp)      # model dir + adapters a1, a2 + HF references

The layout (transformers 5.24 ``finegrained_fp8``): every quantized ``<m>.weight [out, in]`` is
``float8_e4m3fn`` beside ``<m>.weight_scale_inv`` fp32 ``[ceil(out/128), ceil(in/128)]``, and the
weight is ``fp8[r, c] * weight_scale_inv[r // 128, c // 128]`` with scale = block amax / 448
(``ue8m0``: rounded up to a power of two). Fused 3-D experts (``experts.gate_up_proj`` /
``experts.down_proj``) get ``<name>_scale_inv [E, ceil(out/128), ceil(in/128)]``. Quantized here:
attention q/k/v/o, experts, dense MLPs (and lm_head when asked); embeddings, norms and routers
stay fp32, as in the published FP8 checkpoints.

Sizes: the models of :mod:`tests.hf_factory` grown so that every dim a layout cuts is a
multiple of 128 (head_dim 128, expert intermediate 256, dense intermediate 512): the FP8 cut
rule then admits (tp, ep) = (2, 2) and (4, 2). ``partial=True`` gives dims that are not
multiples of 128 (last blocks partial) for one-process tests.

References: transformers' own FP8 path (``from_pretrained`` on the FP8 directory: on a CPU it
dequantizes every weight with its scales) with the PEFT adapter loaded on top. Its
dequantization infers the block size from the scale grid (``rows // scale_rows``), which is only
right when every dim is a multiple of 128 or within one block, and it reads fused 3-D FP8
expert tensors without their scales; ``partial`` and ``fused`` cases therefore use the
dequantized fp32 twin written here instead (:func:`write_dequantized_twin`).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from tests.e2e_cases import Case
from tests.hf_factory import ATTENTION_MODULES, EXPERT_PARAMETERS, make_model, make_peft_adapter, \
    save_model

BLOCK = 128
FP8_MAX = 448.0

SIZES = {
    "qwen3_moe": dict(hidden_size=128, head_dim=128, moe_intermediate_size=256,
                      intermediate_size=512),
    "mixtral": dict(hidden_size=128, head_dim=128, intermediate_size=256),
    "olmoe": dict(hidden_size=512, head_dim=128, intermediate_size=256),
}
PARTIAL = {  # no dim a multiple of 128 except where the architecture forces it
    "qwen3_moe": dict(hidden_size=160, head_dim=40, moe_intermediate_size=200,
                      intermediate_size=136),
    "mixtral": dict(hidden_size=160, head_dim=40, intermediate_size=200),
    "olmoe": dict(hidden_size=160, head_dim=40, intermediate_size=200),
}
QUANTIZED = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
             "w1", "w2", "w3")


def quantize_blocks(w: torch.Tensor, scale_fmt: str = "float"):
    """``(fp8 [.., N, K], scale_inv [.., ceil(N/128), ceil(K/128)])``, one 128x128 block at a
    time (deliberately a loop, independent of the package's vectorized code)."""
    *lead, N, K = w.shape
    nb, kb = math.ceil(N / BLOCK), math.ceil(K / BLOCK)
    q = torch.empty(w.shape, dtype=torch.float8_e4m3fn)
    s = torch.empty(*lead, nb, kb, dtype=torch.float32)
    w = w.float()
    for i in range(nb):
        for j in range(kb):
            blk = w[..., i * BLOCK:(i + 1) * BLOCK, j * BLOCK:(j + 1) * BLOCK]
            amax = blk.abs().amax(dim=(-2, -1))
            sc = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
            if scale_fmt == "ue8m0":
                sc = torch.exp2(torch.ceil(torch.log2(sc)))
            s[..., i, j] = sc
            q[..., i * BLOCK:(i + 1) * BLOCK, j * BLOCK:(j + 1) * BLOCK] = (
                blk / sc[..., None, None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q, s


def dequantize_blocks(q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    N, K = q.shape[-2:]
    full = s.repeat_interleave(BLOCK, -2)[..., :N, :].repeat_interleave(BLOCK, -1)[..., :K]
    return q.float() * full


def _quantized(key: str, lm_head: bool) -> bool:
    if key == "lm_head.weight":
        return lm_head
    parts = key.split(".")
    return key.endswith(".weight") and len(parts) > 2 and parts[-2] in QUANTIZED


def quantize_checkpoint(model_dir: Path, *, lm_head: bool = False, fused: bool = False,
                        scale_fmt: str = "float", quant_config: dict | None = None) -> None:
    """Rewrite ``model_dir`` (a saved tiny model) in the FP8 layout, in place."""
    path = model_dir / "model.safetensors"
    sd = load_file(str(path))
    out: dict[str, torch.Tensor] = {}
    for key, v in sd.items():
        if _quantized(key, lm_head):
            out[key], out[key[:-len("weight")] + "weight_scale_inv"] = quantize_blocks(
                v, scale_fmt)
        else:
            out[key] = v
    if fused:
        out = _fuse_experts(out)
    save_file(out, str(path), metadata={"format": "pt"})
    cfg = json.loads((model_dir / "config.json").read_text())
    cfg["quantization_config"] = quant_config or {
        "quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [BLOCK, BLOCK],
        "activation_scheme": "dynamic", "scale_fmt": scale_fmt,
        "modules_to_not_convert": [] if lm_head else ["lm_head"]}
    (model_dir / "config.json").write_text(json.dumps(cfg))


def _fuse_experts(sd: dict) -> dict:
    """Per-expert FP8 keys -> fused 3-D ``experts.gate_up_proj`` / ``down_proj`` (+ scales),
    quantized again from the dequantized per-expert weights (gate rows then up rows)."""
    out, groups = {}, {}
    for key, v in sd.items():
        parts = key.split(".")
        if ".experts." in key and parts[-3].isdigit():
            prefix = ".".join(parts[:-3])
            groups.setdefault(prefix, {})
            if parts[-1] == "weight":
                w = dequantize_blocks(v, sd[key[:-len("weight")] + "weight_scale_inv"])
                groups[prefix][(int(parts[-3]), parts[-2])] = w
        else:
            out[key] = v
    for prefix, g in groups.items():
        E = 1 + max(e for e, _ in g)
        names = {n for _, n in g}
        gate, up, down = (("w1", "w3", "w2") if "w1" in names else
                          ("gate_proj", "up_proj", "down_proj"))
        gu = torch.stack([torch.cat([g[(e, gate)], g[(e, up)]]) for e in range(E)])
        dn = torch.stack([g[(e, down)] for e in range(E)])
        for name, w in (("gate_up_proj", gu), ("down_proj", dn)):
            out[f"{prefix}.{name}"], out[f"{prefix}.{name}_scale_inv"] = quantize_blocks(w)
    return out


def write_dequantized_twin(fp8_dir: Path, out_dir: Path) -> Path:
    """The fp32 checkpoint of the same weights (what FP8 means when dequantized)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    sd = load_file(str(fp8_dir / "model.safetensors"))
    twin = {}
    for k, v in sd.items():
        if k.endswith("scale_inv"):
            continue
        if v.dtype != torch.float8_e4m3fn:
            twin[k] = v
        elif k.endswith(".weight"):
            twin[k] = dequantize_blocks(v, sd[k[:-len("weight")] + "weight_scale_inv"])
        else:  # fused 3-D experts: written back per expert, the layout transformers reads
            w = dequantize_blocks(v, sd[f"{k}_scale_inv"])
            prefix, name = k.rsplit(".", 1)
            gate, up, down = (("w1", "w3", "w2") if "block_sparse_moe" in k else
                              ("gate_proj", "up_proj", "down_proj"))
            for e in range(w.shape[0]):
                if name == "down_proj":
                    twin[f"{prefix}.{e}.{down}.weight"] = w[e].clone()
                else:
                    g, u = w[e].chunk(2)
                    twin[f"{prefix}.{e}.{gate}.weight"] = g.clone()
                    twin[f"{prefix}.{e}.{up}.weight"] = u.clone()
    save_file(twin, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((fp8_dir / "config.json").read_text())
    cfg.pop("quantization_config")
    (out_dir / "config.json").write_text(json.dumps(cfg))
    return out_dir


def fake_quant(x: torch.Tensor) -> torch.Tensor:
    """``x`` after dynamic e4m3 quantization per token (last dim) and 128 columns, and back:
    scale = group amax / 448 (amax floored at 1e-10), values clamped to +-448."""
    *lead, K = x.shape
    kb = math.ceil(K / BLOCK)
    xf = torch.nn.functional.pad(x.float(), (0, kb * BLOCK - K)).reshape(*lead, kb, BLOCK)
    s = xf.abs().amax(-1, keepdim=True).clamp(min=1e-10) / FP8_MAX
    q = (xf / s).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).float() * s
    return q.reshape(*lead, kb * BLOCK)[..., :K].to(x.dtype)


def _base_and_delta(experts, name: str):
    """(W, W_eff - W) of an expert parameter; PEFT's ``target_parameters`` LoRA parametrizes
    it (``parametrizations.<name>.original`` is the base) while its adapter is active."""
    eff = getattr(experts, name)
    par = getattr(experts, "parametrizations", None)
    if par is not None and name in par:
        base = par[name].original
        return base, eff - base
    return eff, None


def _fake_quant_experts_forward(self, hidden_states, top_k_index, top_k_weights):
    """Eager experts with the base products on quantized activations and the LoRA deltas on
    the unquantized ones (what the FP8 kernels compute)."""
    import torch.nn.functional as F

    w_gu, d_gu = _base_and_delta(self, "gate_up_proj")
    w_d, d_d = _base_and_delta(self, "down_proj")
    out = torch.zeros_like(hidden_states)
    for e in range(w_gu.shape[0]):
        tok, k = (top_k_index == e).nonzero(as_tuple=True)
        if len(tok) == 0:
            continue
        x = hidden_states[tok]
        gu = F.linear(fake_quant(x), w_gu[e])
        if d_gu is not None:
            gu = gu + F.linear(x, d_gu[e])
        gate, up = gu.chunk(2, dim=-1)
        h = self.act_fn(gate) * up
        y = F.linear(fake_quant(h), w_d[e])
        if d_d is not None:
            y = y + F.linear(h, d_d[e])
        out.index_add_(0, tok, y * top_k_weights[tok, k, None])
    return out


def install_fake_quant(model, lm_head: bool = False):
    """Make a transformers(+PEFT) model compute like the FP8 runtime: every FP8 projection's
    base product reads its input quantized per token and 128 columns (a pre-hook on the base
    ``nn.Linear``; PEFT's ``lora_A`` reads the unquantized input), and the experts likewise
    (their forward replaced by :func:`_fake_quant_experts_forward`). Returns ``model``."""
    import types

    for name, m in model.named_modules():
        parts = name.split(".")
        own = parts[-2] if parts[-1] == "base_layer" and len(parts) > 1 else parts[-1]
        if isinstance(m, torch.nn.Linear) and (own in QUANTIZED or (lm_head and own == "lm_head")):
            m.register_forward_pre_hook(lambda mod, args: (fake_quant(args[0]),) + args[1:])
        if hasattr(m, "gate_up_proj") and hasattr(m, "down_proj") and hasattr(m, "act_fn"):
            m.forward = types.MethodType(_fake_quant_experts_forward, m)
    return model


@dataclass
class FP8Case(Case):
    """``hf``: the references with the activation quantization simulated (the FP8 runtime's
    math); ``hf_plain``: transformers' own FP8 path as it is (dequantized weights, unquantized
    activations: the ``--dequantize-fp8`` runtime's math)."""

    overrides: dict = field(default_factory=dict)
    hf_plain: dict = field(default_factory=dict)


def load_reference(model_dir: Path, adapter_dir: Path | None, fake_quant_lm_head=None):
    """transformers' model from ``model_dir`` (its FP8 path when the config says FP8) in fp32,
    with the PEFT adapter at ``adapter_dir`` on top; with ``fake_quant_lm_head`` not None, also
    the activation quantization of :func:`install_fake_quant`."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # "defaulting to dequantizing" on a CPU, once per load
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    model.config._experts_implementation = "eager"
    if hasattr(model, "set_experts_implementation"):
        model.set_experts_implementation("eager")
    if adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter_dir))
    if fake_quant_lm_head is not None:
        install_fake_quant(model, lm_head=fake_quant_lm_head)
    return model.eval()


def build_fp8_case(arch: str, root: Path, *, seed: int = 0, hybrid: bool = False,
                   partial: bool = False, references: bool = True, **quant) -> FP8Case:
    """An FP8 model and two adapters (as in :func:`tests.e2e_cases.build_case`) under ``root``;
    ``references=False`` skips loading the transformers references (GPU tests)."""
    overrides = dict(PARTIAL[arch] if partial else SIZES[arch])
    if hybrid:
        overrides.update(num_hidden_layers=3, mlp_only_layers=[1])
    root = Path(root)
    model_dir = save_model(make_model(arch, seed=seed, **overrides), root / "model")
    quantize_checkpoint(model_dir, **quant)
    make_peft_adapter(make_model(arch, seed=seed, **overrides), root / "a1", r=4, alpha=8,
                      target_modules=ATTENTION_MODULES, target_parameters=EXPERT_PARAMETERS,
                      seed=seed + 1)
    make_peft_adapter(make_model(arch, seed=seed, **overrides), root / "a2", r=8, alpha=4,
                      target_modules=["q_proj", "v_proj"], target_parameters=EXPERT_PARAMETERS,
                      use_rslora=True, seed=seed + 2)
    adapters = {"a1": root / "a1", "a2": root / "a2"}
    if not references:
        return FP8Case(arch, model_dir, adapters, {}, overrides)
    # transformers 5.24 reads fused 3-D FP8 expert tensors without their scales (measured: the
    # raw e4m3 values), so fused cases are checked against the twin as well.
    use_twin = partial or quant.get("fused", False)
    ref_dir = write_dequantized_twin(model_dir, root / "twin") if use_twin else model_dir
    lm = quant.get("lm_head", False)
    hf = {None: load_reference(ref_dir, None, lm)}
    hf.update({n: load_reference(ref_dir, d, lm) for n, d in adapters.items()})
    plain = {None: load_reference(ref_dir, None)}
    plain.update({n: load_reference(ref_dir, d) for n, d in adapters.items()})
    return FP8Case(arch, model_dir, adapters, hf, overrides, plain)
