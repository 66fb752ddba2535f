"""Attention of DeepSeek-V3 (MLA), GLM-4.5 (partial rotary, q/k norm, biases) and gpt-oss
(sinks, sliding window, YaRN, biases) against transformers' own attention modules with the
same random weights (fp32, CPU), on one rank and split over mocked TP ranks.

transformers runs its eager attention (explicit softmax; gpt-oss's sink column) with an
additive causal mask; ours writes keys and values into a paged cache (pages shuffled, every
unwritten slot NaN) and runs the paged-attention reference or its Triton kernel (interpreter;
sinks as the online softmax's starting term): they differ by fp32 reordering only, ``atol
1e-5`` on outputs of size O(1). Each feature is checked to matter at these sizes (dropping it
moves the output far beyond the tolerance).
"""

import dataclasses

import pytest
import torch

from moelora_dist.config.model import ModelConfig
from moelora_dist.models.attention import HeadSplit, TPAttention, load_attention_weights
from moelora_dist.models.batch import ForwardBatch
from moelora_dist.models.mla import TPMLA, load_mla_weights
from moelora_dist.models.rope import RotaryEmbedding, rope_tables_for
from tests.family_parts import PAGE_SIZE, batch_and_cache, layer_state
from tests.hf_families import family_config

S = 9  # longer than gpt-oss's window of 4
ATOL = 1e-5
MAX_POS = 64


def _cfg(family, **over):
    hf = family_config(family, **over)
    hf._attn_implementation = "eager"
    raw = hf.to_dict()
    return hf, ModelConfig.from_dict(raw)


def _hf_attention(family, hf_cfg, layer):
    from transformers.models.deepseek_v3 import modeling_deepseek_v3 as ds
    from transformers.models.glm4_moe import modeling_glm4_moe as glm
    from transformers.models.gpt_oss import modeling_gpt_oss as oss

    mod = {"deepseek_v3": (ds.DeepseekV3Attention, ds.DeepseekV3RotaryEmbedding),
           "glm4_moe": (glm.Glm4MoeAttention, glm.Glm4MoeRotaryEmbedding),
           "gpt_oss": (oss.GptOssAttention, oss.GptOssRotaryEmbedding)}[family]
    torch.manual_seed(layer + 3)
    attn = mod[0](hf_cfg, layer_idx=layer)
    with torch.no_grad():
        for p in attn.parameters():
            p.copy_(torch.randn(p.shape) * (1.0 if p.dim() == 1 else 0.3))
    return attn.eval(), mod[1](hf_cfg)


def _hf_out(attn, rope, x, window=None):
    T = x.shape[1]
    pos = torch.arange(T)[None]
    i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
    ok = (j <= i) if window is None else (j <= i) & (j > i - window)
    mask = torch.zeros(T, T).masked_fill(~ok, float("-inf"))[None, None]
    with torch.no_grad():
        return attn(x, position_embeddings=rope(x, pos), attention_mask=mask)[0][0]


def _ours(family, cfg, attn, layer, x, tp=1, rank=0, backend="torch"):
    split = HeadSplit.for_rank(cfg, tp, rank)
    reader = layer_state(attn, f"model.layers.{layer}.self_attn")
    if cfg.attention == "mla":
        w = load_mla_weights(reader, cfg, layer, split, torch.float32)
        layer_obj = TPMLA(cfg, layer, split, w, backend=backend)
    else:
        w = load_attention_weights(reader, cfg, layer, split, torch.float32)
        layer_obj = TPAttention(cfg, layer, split, w, backend=backend)
    batch, cache, _ = batch_and_cache([x.shape[0]], [0], cfg.num_layers, split.num_kv,
                                      cfg.head_dim)
    bias = layer_obj.w.pop("o_proj.bias", None) if tp > 1 else None
    out = layer_obj.forward(x, batch, cache, rope_tables_for(cfg.rope, MAX_POS))
    return out, bias


FAMILY_CASES = [("deepseek_v3", {}, 1), ("deepseek_v3", dict(attention_bias=True), 1),
                ("deepseek_v3", dict(q_lora_rank=None), 1), ("glm4_moe", {}, 1),
                ("gpt_oss", {}, 0), ("gpt_oss", {}, 1)]
IDS = ["mla", "mla_biases", "mla_no_q_lora", "glm", "gpt_oss_sliding", "gpt_oss_full"]


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("family,over,layer", FAMILY_CASES, ids=IDS)
def test_attention_matches_transformers(family, over, layer, backend):
    hf_cfg, cfg = _cfg(family, **over)
    attn, rope = _hf_attention(family, hf_cfg, layer)
    x = torch.randn(1, S, cfg.hidden_size, generator=torch.Generator().manual_seed(1))
    window = cfg.window_of(layer)
    want = _hf_out(attn, rope, x, window)
    got, _ = _ours(family, cfg, attn, layer, x[0], backend=backend)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


@pytest.mark.parametrize("family,over,layer,tp", [
    ("deepseek_v3", dict(attention_bias=True), 1, 2), ("deepseek_v3", {}, 1, 4),
    ("glm4_moe", {}, 1, 2), ("glm4_moe", {}, 1, 4), ("gpt_oss", {}, 0, 4)],
    ids=["mla_tp2", "mla_tp4", "glm_tp2", "glm_tp4_kv_replicated", "gpt_oss_tp4"])
def test_attention_split_over_tp_ranks_sums_to_the_whole(family, over, layer, tp):
    """Heads split (MLA's latent projections replicated on every rank, sinks with their
    heads, kv heads replicated when fewer than ranks); o's partial sums add up, its bias
    once."""
    hf_cfg, cfg = _cfg(family, **over)
    attn, rope = _hf_attention(family, hf_cfg, layer)
    x = torch.randn(1, S, cfg.hidden_size, generator=torch.Generator().manual_seed(2))
    want = _hf_out(attn, rope, x, cfg.window_of(layer))
    total, bias = 0, None
    for r in range(tp):
        part, bias = _ours(family, cfg, attn, layer, x[0], tp, r)
        total = total + part
    if bias is not None:
        total = total + bias
    torch.testing.assert_close(total, want, atol=ATOL, rtol=0)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_two_requests_then_decode_match_one_at_a_time(backend):
    """Packed requests of different lengths, then a decode step from the paged cache: each
    equals transformers on that request alone (window, sinks and YaRN positions per
    request)."""
    hf_cfg, cfg = _cfg("gpt_oss")
    attn, rope_hf = _hf_attention("gpt_oss", hf_cfg, 0)
    split = HeadSplit.for_rank(cfg, 1, 0)
    layer = TPAttention(cfg, 0, split, load_attention_weights(
        layer_state(attn, "model.layers.0.self_attn"), cfg, 0, split, torch.float32),
        backend=backend)
    rope = rope_tables_for(cfg.rope, MAX_POS)
    g = torch.Generator().manual_seed(3)
    xs = [torch.randn(n, cfg.hidden_size, generator=g) for n in (7, 3)]
    batch, cache, tables = batch_and_cache([7, 3], [0, 0], 1, split.num_kv, cfg.head_dim,
                                           max_lens=[8, 4])
    out = layer.forward(torch.cat(xs), batch, cache, rope)
    for x, o in zip(xs, out.split([7, 3])):
        torch.testing.assert_close(o, _hf_out(attn, rope_hf, x[None], 4), atol=ATOL, rtol=0)
    nxt = torch.randn(2, cfg.hidden_size, generator=g)  # one more token each
    step = ForwardBatch.build([1, 1], [7, 3], tables, PAGE_SIZE, "cpu")
    assert step.decode_only
    got = layer.forward(nxt, step, cache, rope)
    for b, (x, n) in enumerate(zip(xs, (7, 3))):
        full = _hf_out(attn, rope_hf, torch.cat([x, nxt[b:b + 1]])[None], 4)
        torch.testing.assert_close(got[b], full[n], atol=ATOL, rtol=0)


@pytest.mark.parametrize("family", ["deepseek_v3", "glm4_moe", "gpt_oss"])
def test_rotary_tables_match_transformers(family):
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3RotaryEmbedding
    from transformers.models.glm4_moe.modeling_glm4_moe import Glm4MoeRotaryEmbedding
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssRotaryEmbedding

    hf_cfg, cfg = _cfg(family)
    cls = {"deepseek_v3": DeepseekV3RotaryEmbedding, "glm4_moe": Glm4MoeRotaryEmbedding,
           "gpt_oss": GptOssRotaryEmbedding}[family]
    hf = cls(hf_cfg)
    pos = torch.arange(200)
    cos_hf, sin_hf = hf(torch.zeros(1, dtype=torch.float32), pos[None])
    ours = RotaryEmbedding(cfg.rope)
    cos, sin = ours.cos_sin(pos, torch.float32)
    assert torch.equal(ours.inv_freq, hf.inv_freq)
    if family == "gpt_oss":  # transformers keeps half the table (it rotates by chunks)
        cos, sin = cos[:, : cos.shape[1] // 2], sin[:, : sin.shape[1] // 2]
    assert torch.equal(cos, cos_hf[0]) and torch.equal(sin, sin_hf[0])
    # the paged path's [positions, R/2] tables (YaRN's attention factor in them) are the
    # first halves of transformers' (rotate-half and interleaved tables alike)
    cos_p, sin_p = rope_tables_for(cfg.rope, 200)
    half = cos_p.shape[1]
    torch.testing.assert_close(cos_p, cos_hf[0][:, :half], atol=1e-6, rtol=0)
    torch.testing.assert_close(sin_p, sin_hf[0][:, :half], atol=1e-6, rtol=0)
    if cfg.rope.kind == "yarn":  # YaRN changes the tables at these sizes
        plain = RotaryEmbedding(dataclasses.replace(cfg.rope, kind="default"))
        assert (plain.cos_sin(pos, torch.float32)[0] - cos_hf[0].repeat(
            1, 2 if family == "gpt_oss" else 1)).abs().max() > 0.1


@pytest.mark.parametrize("what", ["sinks", "window", "yarn", "mscale", "partial_rotary"])
def test_each_feature_matters(what):
    """Dropping the feature moves the output far beyond the tolerance (else the matching
    tests above would prove nothing about it)."""
    family = {"sinks": "gpt_oss", "window": "gpt_oss", "yarn": "gpt_oss",
              "mscale": "deepseek_v3", "partial_rotary": "glm4_moe"}[what]
    hf_cfg, cfg = _cfg(family)
    layer = 0 if family == "gpt_oss" else 1
    attn, rope = _hf_attention(family, hf_cfg, layer)
    x = torch.randn(1, S, cfg.hidden_size, generator=torch.Generator().manual_seed(4))
    want = _hf_out(attn, rope, x, cfg.window_of(layer))
    if what == "sinks":
        cfg2 = dataclasses.replace(cfg, sinks=False)
    elif what == "window":
        cfg2 = dataclasses.replace(cfg, layer_windows=(None,) * cfg.num_layers)
    elif what == "yarn":
        cfg2 = dataclasses.replace(cfg, rope=dataclasses.replace(cfg.rope, kind="default"))
    elif what == "mscale":
        cfg2 = dataclasses.replace(cfg, rope=dataclasses.replace(cfg.rope, mscale_all_dim=None,
                                                                 mscale=None))
    else:
        cfg2 = dataclasses.replace(cfg, rope=dataclasses.replace(cfg.rope,
                                                                 rotary_dim=cfg.head_dim))
    got, _ = _ours(family, cfg2, attn, layer, x[0])
    assert (got - want).abs().max() > 100 * ATOL
