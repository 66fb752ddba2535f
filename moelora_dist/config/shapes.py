"""Public model shapes as ``config.json`` dicts (no weights): the random-weight server
(``moelora-dist serve --random-weights NAME``, :mod:`moelora_dist.serve.random_model`) and the
engine benchmarks (``benchmarks/engine/shapes.py``) read them from here.

The module imports nothing, so the launch counter run against an older tree
(``benchmarks/engine/launches.py``) can take a copy of this one file along.
"""

# Qwen3-30B-A3B's config.json: H 2048, 32 heads (4 kv heads) of 128, 128 experts top-8, expert
# intermediate 768, 48 layers.
QWEN3_30B_A3B = dict(model_type="qwen3_moe", vocab_size=151936, hidden_size=2048,
                     num_attention_heads=32, num_key_value_heads=4, head_dim=128,
                     num_experts=128, num_experts_per_tok=8, moe_intermediate_size=768,
                     intermediate_size=6144, norm_topk_prob=True, rms_norm_eps=1e-6,
                     rope_parameters={"rope_type": "default", "rope_theta": 1e6},
                     max_position_embeddings=40960, num_hidden_layers=48)
# The same architecture at toy size: CPU tests and smoke runs.
TINY = dict(QWEN3_30B_A3B, vocab_size=256, hidden_size=64, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, num_experts=8, num_experts_per_tok=2,
            moe_intermediate_size=32, intermediate_size=96, num_hidden_layers=2,
            max_position_embeddings=4096)
# ``--random-weights`` name -> shape
SHAPES = {"qwen3-30b-a3b": QWEN3_30B_A3B, "tiny": TINY}
