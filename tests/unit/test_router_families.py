"""The DeepSeek-V3 / GLM-4.5 and gpt-oss routers against transformers' own router modules
(``DeepseekV3TopkRouter``, ``Glm4MoeTopkRouter``, ``GptOssTopKRouter``, same weights), on
random inputs and on inputs with ties at the top-k (and top-group) boundary; and the
plain-loop references against the fast paths where nothing ties.

The router weight is the identity (H = E), so the logits are exactly the inputs and a test can
choose them: tied values, a correction bias that changes the choice, groups that exclude an
expert the ungrouped top-k would take. Comparisons are exact (same fp32 op sequence as
transformers): ids in transformers' order and weights bit for bit.
"""

import pytest
import torch

from moelora_dist.moe.router import (RouterSpec, route_sigmoid_grouped, route_topk_softmax,
                                     route_with)
from moelora_dist.moe.router_reference import sigmoid_grouped_reference, topk_softmax_reference

E, K, G, TOPK_GROUP, SCALING = 16, 4, 4, 2, 2.5


def _hf_grouped(family, logits, bias, *, n_group=G, topk_group=TOPK_GROUP, top_k=K,
                renorm=True, scaling=SCALING):
    if family == "deepseek_v3":
        from transformers import DeepseekV3Config as C
        from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter as R
    else:
        from transformers import Glm4MoeConfig as C
        from transformers.models.glm4_moe.modeling_glm4_moe import Glm4MoeTopkRouter as R
    cfg = C(hidden_size=E, n_routed_experts=E, num_experts_per_tok=top_k, n_group=n_group,
            topk_group=topk_group, norm_topk_prob=renorm, routed_scaling_factor=scaling)
    router = R(cfg)
    with torch.no_grad():
        router.weight.copy_(torch.eye(E))
        router.e_score_correction_bias.copy_(bias)
        _, w, ids = router(logits)
    return w, ids


def _cases(seed: int, tied: bool):
    g = torch.Generator().manual_seed(seed)
    if tied:  # few distinct values: many experts and groups tie near every boundary
        logits = torch.randint(-2, 3, (64, E), generator=g).float() * 0.5
        bias = torch.randint(0, 2, (E,), generator=g).float() * 0.25
    else:
        logits = torch.randn(64, E, generator=g) * 2
        bias = torch.randn(E, generator=g) * 0.3
    return logits, bias


@pytest.mark.parametrize("family", ["deepseek_v3", "glm4_moe"])
@pytest.mark.parametrize("tied", [False, True], ids=["random", "ties_at_boundary"])
def test_sigmoid_grouped_matches_transformers(family, tied):
    logits, bias = _cases(0, tied)
    want_w, want_ids = _hf_grouped(family, logits, bias)
    w, ids = route_sigmoid_grouped(logits, bias, K, G, TOPK_GROUP, True, SCALING)
    assert ids.dtype == torch.int32 and w.dtype == torch.float32
    assert torch.equal(ids.long(), want_ids)
    assert torch.equal(w, want_w)
    spec = RouterSpec(K, "sigmoid_grouped", True, G, TOPK_GROUP, SCALING)
    w2, ids2 = route_with(spec, logits, bias)
    assert torch.equal(w2, w) and torch.equal(ids2, ids)


def test_reference_equals_fast_path_without_ties():
    logits, bias = _cases(1, tied=False)
    w, ids = route_sigmoid_grouped(logits, bias, K, G, TOPK_GROUP, True, SCALING)
    rw, rids = sigmoid_grouped_reference(logits, bias, K, G, TOPK_GROUP, True, SCALING)
    order, rorder = ids.long().sort(-1), rids.sort(-1)
    assert torch.equal(order.values, rorder.values)
    torch.testing.assert_close(w.double().gather(1, order.indices), rw.gather(1, rorder.indices),
                               rtol=1e-6, atol=0)
    w, ids = route_topk_softmax(logits, K)
    rw, rids = topk_softmax_reference(logits, K)
    assert torch.equal(ids.long(), rids)  # both in decreasing logit order
    torch.testing.assert_close(w.double(), rw, rtol=1e-6, atol=0)


def test_correction_bias_chooses_but_never_weighs():
    logits, bias = _cases(2, tied=False)
    bias = bias * 4  # large enough to change the choice of many tokens
    want_w, want_ids = _hf_grouped("deepseek_v3", logits, bias)
    w, ids = route_sigmoid_grouped(logits, bias, K, G, TOPK_GROUP, True, SCALING)
    assert torch.equal(ids.long(), want_ids) and torch.equal(w, want_w)
    # The inputs exercise the bias: dropping it changes the chosen experts of some tokens ...
    _, ids_no_bias = route_sigmoid_grouped(logits, torch.zeros(E), K, G, TOPK_GROUP, True,
                                           SCALING)
    changed = (ids_no_bias.long().sort(-1).values != want_ids.sort(-1).values).any(-1)
    assert changed.float().mean() > 0.3
    # ... and the weights are the unbiased scores (renormalized, scaled), not the choice.
    scores = logits.sigmoid().gather(1, ids.long())
    torch.testing.assert_close(w, scores / (scores.sum(-1, keepdim=True) + 1e-20) * SCALING)


def test_groups_limit_the_choice():
    logits, bias = _cases(3, tied=False)
    want_w, want_ids = _hf_grouped("glm4_moe", logits, bias, topk_group=1)
    w, ids = route_sigmoid_grouped(logits, bias, K, G, 1, True, SCALING)
    assert torch.equal(ids.long(), want_ids) and torch.equal(w, want_w)
    per = E // G
    assert ((ids // per) == (ids[:, :1] // per)).all()  # one group: every pick inside it
    # The inputs exercise the groups: without them most tokens take experts of other groups.
    _, ids_no_groups = route_sigmoid_grouped(logits, bias, K, 1, 1, True, SCALING)
    differs = (ids_no_groups.long().sort(-1).values != want_ids.sort(-1).values).any(-1)
    assert differs.float().mean() > 0.3


@pytest.mark.parametrize("tied", [False, True], ids=["random", "ties_at_boundary"])
def test_gpt_oss_router_matches_transformers(tied):
    from transformers import GptOssConfig
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssTopKRouter

    g = torch.Generator().manual_seed(4)
    H = 24
    x = (torch.randint(-2, 3, (64, H), generator=g).float() if tied
         else torch.randn(64, H, generator=g))
    router = GptOssTopKRouter(GptOssConfig(hidden_size=H, num_local_experts=E,
                                           num_experts_per_tok=K))
    with torch.no_grad():
        w_EH = torch.randint(-1, 2, (E, H), generator=g).float() if tied else \
            torch.randn(E, H, generator=g) * 0.3
        b_E = torch.randint(-1, 2, (E,), generator=g).float() if tied else \
            torch.randn(E, generator=g)
        router.weight.copy_(w_EH)
        router.bias.copy_(b_E)
        logits_hf, want_w, want_ids = router(x)
    logits = torch.nn.functional.linear(x, w_EH, b_E)
    assert torch.equal(logits, logits_hf)
    if tied:  # the input really ties at the boundary for some tokens
        kth = logits.topk(K + 1, dim=-1).values
        assert (kth[:, K - 1] == kth[:, K]).any()
    w, ids = route_topk_softmax(logits, K)
    assert torch.equal(ids.long(), want_ids) and torch.equal(w, want_w)
    # The bias is part of the logits: without it the choice changes for some tokens.
    _, ids_nb = route_topk_softmax(torch.nn.functional.linear(x, w_EH), K)
    assert (ids_nb != ids).any()


def test_grouped_ties_really_tie():
    """The tied inputs above do tie at the expert and the group boundary (else the tie test
    would prove nothing)."""
    logits, bias = _cases(0, tied=True)
    choice = logits.sigmoid() + bias
    kth = choice.topk(K + 1, dim=-1).values
    assert (kth[:, K - 1] == kth[:, K]).float().mean() > 0.2
    gs = choice.view(-1, G, E // G).topk(2, -1).values.sum(-1).sort(-1, descending=True).values
    assert int((gs[:, TOPK_GROUP - 1] == gs[:, TOPK_GROUP]).sum()) >= 2
