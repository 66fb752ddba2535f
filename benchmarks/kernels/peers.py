"""Reference rows of the kernel benchmark: the peers' numbers from issue 16's table.

Source (cited in every row's ``source`` column): issue 16, "Kernels at every shape", measured
side by side on one H200 (bf16, CUDA-graph replay, 8 adapters of rank 16 spread over the tokens,
random routing): the MoE and MoE-LoRA Triton paths of vLLM 0.33 and SGLang 0.5.23 with their own
tuned H200 tile configs, and this project's layer before the tuning work (ms). No peer code is
run or vendored here; these are the table's numbers, for comparison in the CSV and the plot.
"""

from __future__ import annotations

SOURCE = ("issue 16 table: one H200, bf16, CUDA-graph replay, 8 adapters r16 on the tokens, "
          "random routing")
COLUMNS = ("vLLM 0.33 base", "vLLM 0.33 LoRA 8xr16", "SGLang 0.5.23 base",
           "SGLang 0.5.23 LoRA 8xr16", "moelora_dist before tuning base",
           "moelora_dist before tuning LoRA 8xr16")
TABLE = {  # (model, T): one value per COLUMNS entry
    ("qwen3-30b-a3b", 1): (0.041, 0.085, 0.040, 0.119, 0.043, 0.070),
    ("qwen3-30b-a3b", 16): (0.238, 0.287, 0.234, 0.403, 0.223, 0.269),
    ("qwen3-30b-a3b", 64): (0.315, 0.412, 0.312, 0.596, 0.298, 0.365),
    ("qwen3-30b-a3b", 256): (0.342, 0.555, 0.338, 0.842, 0.340, 0.475),
    ("qwen3-30b-a3b", 1024): (0.407, 0.957, 0.400, 1.071, 0.574, 0.880),
    ("qwen3-30b-a3b", 4096): (0.879, 1.479, 0.850, 1.940, 0.820, 1.088),
    ("mixtral-8x7b", 1): (0.201, 0.418, 0.207, 0.463, 0.188, 0.270),
    ("mixtral-8x7b", 16): (0.663, 0.874, 0.669, 1.041, 0.674, 0.817),
    ("mixtral-8x7b", 64): (0.669, 0.992, 0.673, 1.163, 0.913, 1.090),
    ("mixtral-8x7b", 256): (0.741, 1.252, 0.740, 1.332, 1.647, 1.898),
    ("mixtral-8x7b", 1024): (1.594, 2.122, 1.631, 2.397, 1.806, 2.093),
    ("mixtral-8x7b", 4096): (5.497, 6.128, 5.507, 8.176, 6.402, 6.741),
}


def rows() -> list[dict]:
    """One CSV row per number of the table (``config`` starts with ``peer`` or ``before``)."""
    out = []
    for (model, T), values in TABLE.items():
        for col, ms in zip(COLUMNS, values):
            lora = "LoRA" in col
            kind = "before" if col.startswith("moelora_dist") else "peer"
            out.append(dict(model=model, T=T, adapters=8 if lora else 0, rank=16 if lora else 0,
                            share=1.0 if lora else 0.0, config=f"{kind} {col}", ok=True,
                            ms_graph=ms, source=SOURCE))
    return out


def faster_peer(model: str, T: int, lora: bool) -> float | None:
    """The faster peer's ms at (model, T), base or LoRA; None where the table has none."""
    values = TABLE.get((model, T))
    if values is None:
        return None
    return min(values[1], values[3]) if lora else min(values[0], values[2])
