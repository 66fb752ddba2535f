"""End-to-end cases of the families (DeepSeek-V3, GLM-4.5, gpt-oss): a tiny random model on
disk, two real PEFT adapters, a mixed batch, and transformers + PEFT run one request at a time.

    case = build_family_case("gpt_oss", tmp_path)
    ref = hf_logits(case, FAMILY_REQUESTS)

Adapter ``a1`` ("full"): rank 5 (odd), alpha 8, rsLoRA (scale 8 / sqrt(5)), on the attention
projections (MLA's five, or q/k/v/o), the shared experts and the dense MLP of layer 0
(DeepSeek-V3, GLM-4.5), the router and every routed expert parameter. Adapter ``a2``
("experts"): rank 4, alpha 8, on the routed experts only. Prompts run past gpt-oss's window
of 4. Token ids stay below the vocabulary of 128.
"""

from __future__ import annotations

from pathlib import Path

from moelora_dist.engine.engine import Engine
from tests.e2e_cases import Case
from tests.hf_families import make_family_adapter, make_family_model, save_family_model

FAMILY_REQUESTS = [
    ([3, 4, 5, 6, 7, 8, 9, 10, 11], "a1"),
    ([9, 10], None),
    ([11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22], "a2"),
    ([20, 21, 22, 23, 24, 25], "a1"),
    ([30], "a2"),
    ([40, 41, 42, 43, 44, 45, 46], None),
]
FAMILY_GEN = [([3, 4, 5, 6, 7, 8], "a1", 5), ([7, 8, 9, 10, 11], "a2", 4),
              ([50, 51, 52, 53, 54, 55, 56], None, 3)]
ADAPTERS = {"a1": dict(kind="full", r=5, alpha=8, use_rslora=True),
            "a2": dict(kind="experts", r=4, alpha=8)}


def build_family_case(family: str, root: Path, *, seed: int = 0) -> Case:
    """Save the model and both adapters under ``root``; keep the HF / PEFT models."""
    root = Path(root)
    model_dir = save_family_model(make_family_model(family, seed=seed), root / "model")
    hf = {None: make_family_model(family, seed=seed)}
    for i, (name, kw) in enumerate(ADAPTERS.items()):
        kw = dict(kw)
        hf[name] = make_family_adapter(make_family_model(family, seed=seed), family,
                                       kw.pop("kind"), root / name, seed=seed + 1 + i, **kw)
    return Case(family, model_dir, {n: root / n for n in ADAPTERS}, hf)


def family_engine(model_dir, max_loras: int = 1, max_rank: int = 8, **options) -> Engine:
    """An engine on one process over ``model_dir`` (fp32 CPU unless ``options`` say), with a
    small paged cache of 256 pages of 4 tokens: enough for every request here."""
    return Engine.from_pretrained(str(model_dir), max_loras=max_loras, max_rank=max_rank,
                                  progress=False, num_pages=256, page_size=4, **options)
