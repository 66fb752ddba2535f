"""Top-k routing after the router GEMM: softmax -> top-k -> renormalize (Qwen3-MoE, Mixtral,
OLMoE) and top-k -> softmax over the k (gpt-oss), in one launch.

``naive.py`` is the reference (the exact op sequence of transformers' modules, and the CPU
path), ``kernel.py`` the one-pass Triton kernel, ``ops.py`` its host glue with the same
signatures.
"""
