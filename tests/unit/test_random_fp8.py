"""Random FP8 weights (``RandomFP8Weights``, what ``python -m benchmarks engine --fp8`` serves)
are the model an FP8 checkpoint of the same random values loads as.

- Placement: experts and q/k/v/o (and dense MLPs) are ``BlockFP8Weight``; embeddings, norms,
  router and lm_head stay tensors, unless ``modules_to_not_convert`` leaves lm_head out.
- Values, on a rank of a (tp 2, moe_tp 2) layout: each dequantized piece is the bf16 model's
  piece (same seed, same draw order) within one e4m3 rounding, and equals the unsharded FP8
  weight's piece exactly (rows re-blocked as the loader does).
- Checkpoint: the same draws quantized block by block by the tests' own loop quantizer
  (``tests/fp8_factory.quantize_blocks``), written in the Hugging Face per-expert FP8 layout
  and loaded by ``CheckpointWeights``, give the same logits (to fp32 noise: identical
  weights, identical arithmetic).
- Model: logits and greedy tokens match the same model dequantized (``cfg.fp8.dequantize``,
  what ``--dequantize-fp8`` gives) within the activation-quantization bound below.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from safetensors.torch import save_file

from moelora_dist.config.model import ModelConfig
from moelora_dist.engine.config import EngineConfig
from moelora_dist.engine.engine import Engine
from moelora_dist.engine.sampling import SamplingParams
from moelora_dist.kernels.block_fp8.naive import dequantize
from moelora_dist.kernels.weights_fp8 import BlockFP8Weight
from moelora_dist.models.attention import HeadSplit
from moelora_dist.models.model import MoELoRAModel
from moelora_dist.models.random_weights import RandomFP8Weights, RandomWeights
from moelora_dist.parallel.groups import ParallelGroups
from moelora_dist.parallel.layout import MoEShard
from tests.engine_cases import TINY
from tests.fp8_checks import CLEAN_SHARE
from tests.fp8_factory import quantize_blocks

QUANT = dict(quant_method="fp8", fmt="e4m3", activation_scheme="dynamic",
             weight_block_size=[128, 128])
STD = 0.02  # the benchmark's
# Activations are rounded to e4m3 (3 mantissa bits) in every base GEMM: at most 2^-4 of each
# value. A position's logits may move by at most that share of the largest logit (measured on
# this model: 2%); a model of another seed differs by 140%, and a wrong scale or block by far
# more than 2^-4 (tests/fp8_checks.py: activation quantization is the whole FP8-vs-dequantized
# difference, and rounding flips are what stays near the bound).
REL_TOL = 2 ** -4
# Values of the sharded test: every dim a layout cuts a multiple of 128 where a column dim is
# cut; kv rows of 64 per rank (scale rows re-blocked to 64), hidden 160 (a partial block).
SHARD_CFG = dict(TINY, hidden_size=160, num_attention_heads=4, num_key_value_heads=2,
                 head_dim=64, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=256,
                 intermediate_size=256, mlp_only_layers=[1], quantization_config=QUANT)


def _cfg(raw=None, dequantize: bool = False, **quant) -> ModelConfig:
    cfg = ModelConfig.from_dict(dict(raw or TINY, quantization_config=dict(QUANT, **quant)))
    if dequantize:
        cfg = dataclasses.replace(cfg, fp8=dataclasses.replace(cfg.fp8, dequantize=True))
    return cfg


def _engine(cfg, cls=RandomFP8Weights) -> Engine:
    model = MoELoRAModel.build(cfg, ParallelGroups.single("cpu"),
                               cls(cfg, torch.float32, "cpu", seed=0, std=STD),
                               dtype=torch.float32, max_loras=2, max_rank=8, progress=False)
    return Engine(model, EngineConfig(max_loras=2, max_rank=8, num_pages=256))


def _prompts():
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, TINY["vocab_size"], (n,), generator=g).tolist()
            for n in (3, 5, 9, 12, 17, 30)]


@pytest.mark.parametrize("skip,lm_head_fp8", [(["lm_head"], False), ([], True)],
                         ids=["lm_head_bf16", "lm_head_fp8"])
def test_fp8_where_a_checkpoint_has_it(skip, lm_head_fp8):
    model = _engine(_cfg(modules_to_not_convert=skip)).model
    moe = model.layers[0]["moe"].base
    for w in (moe.w_gate_up, moe.w_down, *(model.layers[1]["attn"].w[k]
                                           for k in ("q_proj", "k_proj", "v_proj", "o_proj"))):
        assert isinstance(w, BlockFP8Weight) and w.weight.dtype == torch.float8_e4m3fn
    assert isinstance(model.lm_head_VH, BlockFP8Weight) == lm_head_fp8
    for t in (model.embed_VH, moe.router, model.layers[0]["ln1"],
              model.layers[0]["attn"].w["q_norm"]):
        assert isinstance(t, torch.Tensor) and t.dtype == torch.float32
    assert model.cfg.fp8 is not None and not model.cfg.fp8.dequantize


def test_fp8_needs_an_fp8_config():
    with pytest.raises(ValueError, match="FP8 quantization_config"):
        RandomFP8Weights(ModelConfig.from_dict(TINY), torch.float32, "cpu")


def _rank_pieces(source, cfg, tp_rank: int, shard: MoEShard) -> dict:
    """One rank's pieces in the order the model builder asks for them (layer 0 MoE, layer 1
    dense): the generator's state makes the order part of the values."""
    split, out = HeadSplit.for_rank(cfg, 2, tp_rank), {}
    out["lm_head"] = source.lm_head()
    for layer in range(cfg.num_layers):
        for k, v in source.attention(layer, split).items():
            out[f"{layer}.{k}"] = v
        if cfg.is_moe_layer(layer):
            e = source.experts(layer, shard)
            out[f"{layer}.gate_up"], out[f"{layer}.down"] = e.w_gate_up, e.w_down
        else:
            for k, v in source.dense_mlp(layer, 2, tp_rank).items():
                out[f"{layer}.{k}"] = v
    return out


def _within_one_e4m3_rounding(w: BlockFP8Weight, want: torch.Tensor) -> None:
    """|dequantized - value| <= half an e4m3 step of value / scale, times the scale: 2^-4 of
    the value for normals, 2^-10 of the scale below 2^-6 (subnormals)."""
    got = dequantize(w)
    ones = BlockFP8Weight(torch.ones_like(w.weight, dtype=torch.float32).to(torch.float8_e4m3fn),
                          w.scale_inv, w.block_n)
    bound = want.abs() * (2 ** -4 + 1e-6) + dequantize(ones) * 2 ** -10
    assert bool(((got - want).abs() <= bound).all())
    assert float((got - want).abs().max()) > 0  # it really was quantized


def test_fp8_pieces_are_the_bf16_pieces_quantized_and_cut_like_a_checkpoint():
    cfg = ModelConfig.from_dict(SHARD_CFG)
    full = MoEShard(4, 256, 0, 4, 0, 256)
    rank = MoEShard(4, 256, 2, 2, 128, 128)  # experts 2, 3 and the second half of I
    fp8 = _rank_pieces(RandomFP8Weights(cfg, torch.float32, "cpu", std=STD), cfg, 1, rank)
    plain = _rank_pieces(RandomWeights(cfg, torch.float32, "cpu", std=STD), cfg, 1, rank)
    whole = _rank_pieces(RandomFP8Weights(cfg, torch.float32, "cpu", std=STD), cfg, 0, full)
    assert fp8.keys() == plain.keys()
    quantized = {k for k, v in fp8.items() if isinstance(v, BlockFP8Weight)}
    assert quantized == {"0.q_proj", "0.k_proj", "0.v_proj", "0.o_proj", "0.gate_up", "0.down",
                         "1.q_proj", "1.k_proj", "1.v_proj", "1.o_proj", "1.gate_proj",
                         "1.up_proj", "1.down_proj"}
    for k in quantized:
        _within_one_e4m3_rounding(fp8[k], plain[k].float())
    for k in fp8.keys() - quantized:
        assert torch.equal(fp8[k], plain[k]), k
    assert fp8["0.k_proj"].block_n == 64  # kv head 1 of 2: rows 64..128 re-blocked
    # the same experts drawn whole (all experts, all of I: the unsharded MoE layer), cut here
    deq = {k: dequantize(v) for k, v in whole.items() if isinstance(v, BlockFP8Weight)}
    I, cut = 256, slice(128, 256)
    assert torch.equal(dequantize(fp8["0.gate_up"]),
                       torch.cat([deq["0.gate_up"][2:, cut], deq["0.gate_up"][2:, I + 128:]], 1))
    assert torch.equal(dequantize(fp8["0.down"]), deq["0.down"][2:, :, cut])


def _write_checkpoint(cfg, raw, path) -> None:
    """The plain random draws in the Hugging Face per-expert FP8 layout (Qwen3-30B-A3B-FP8's),
    quantized by the tests' block loop; config.json with the same quantization_config."""
    src = RandomWeights(cfg, torch.float32, "cpu", seed=0, std=STD)
    split, shard = HeadSplit.for_rank(cfg, 1, 0), MoEShard(cfg.num_experts,
                                                          cfg.moe_intermediate, 0,
                                                          cfg.num_experts, 0,
                                                          cfg.moe_intermediate)
    sd = {"model.embed_tokens.weight": src.embed(), "model.norm.weight": src.norm("model.norm")}
    fp8 = {"lm_head": src.lm_head()} if cfg.fp8.converts("lm_head") else {}
    if not fp8:
        sd["lm_head.weight"] = src.lm_head()
    I = cfg.moe_intermediate
    for layer in range(cfg.num_layers):
        p = f"model.layers.{layer}"
        for name in ("input_layernorm", "post_attention_layernorm"):
            sd[f"{p}.{name}.weight"] = src.norm(f"{p}.{name}")
        for k, v in src.attention(layer, split).items():
            if k.endswith("_proj"):
                fp8[f"{p}.self_attn.{k}"] = v
            else:
                sd[f"{p}.self_attn.{k}.weight"] = v
        e = src.experts(layer, shard)
        sd[f"{p}.mlp.gate.weight"] = e.router_EH
        for x in range(cfg.num_experts):
            q = f"{p}.mlp.experts.{x}"
            fp8.update({f"{q}.gate_proj": e.w_gate_up[x, :I], f"{q}.up_proj": e.w_gate_up[x, I:],
                        f"{q}.down_proj": e.w_down[x]})
    for module, w in fp8.items():
        sd[f"{module}.weight"], sd[f"{module}.weight_scale_inv"] = quantize_blocks(w)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps(raw))


def test_fp8_model_is_its_fp8_checkpoint(tmp_path):
    raw = dict(TINY, quantization_config=QUANT)
    cfg = ModelConfig.from_dict(raw)
    _write_checkpoint(cfg, raw, tmp_path)
    ckpt = Engine.from_pretrained(str(tmp_path), max_loras=2, max_rank=8, progress=False,
                                  num_pages=256)
    assert isinstance(ckpt.model.layers[0]["moe"].base.w_gate_up, BlockFP8Weight)
    ours, theirs = _engine(cfg).prompt_logits(_prompts()), ckpt.prompt_logits(_prompts())
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_fp8_model_matches_its_dequantized_twin():
    fp8, twin = _engine(_cfg()), _engine(_cfg(dequantize=True))
    assert not isinstance(twin.model.layers[0]["moe"].base.w_gate_up, BlockFP8Weight)
    prompts = _prompts()
    ours, ref = fp8.prompt_logits(prompts), twin.prompt_logits(prompts)
    scale = max(float(r.abs().max()) for r in ref)
    worst = max(float((o - r).abs().max()) for o, r in zip(ours, ref))
    assert 0 < worst <= REL_TOL * scale, (worst, scale)
    # Greedy: each FP8 token is the twin's best on the same prefix, or within twice the bound
    # of it (both logits of the pair may move by the bound); most are its best.
    n = 8
    outs = fp8.generate(prompts, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True))
    seqs = [p + o.output_ids for p, o in zip(prompts, outs)]
    best, total = 0, 0
    for p, seq, logits in zip(prompts, seqs, twin.prompt_logits([s[:-1] for s in seqs])):
        for pos, tok in enumerate(seq[len(p):], start=len(p) - 1):
            gap = float(logits[pos].max() - logits[pos, tok])
            assert gap <= 2 * REL_TOL * scale, (pos, tok, gap)
            best += gap == 0
            total += 1
    assert total == n * len(prompts) and best >= CLEAN_SHARE * total
