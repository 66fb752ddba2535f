"""Top-k routing after the router GEMM: softmax -> top-k -> renormalize (Qwen3-MoE, Mixtral,
OLMoE) and top-k -> softmax over the k (gpt-oss), in one launch; for a few tokens the router
GEMM and the softmax top-k in one launch too (``gemm_softmax_topk``).

``naive.py`` is the reference (the exact op sequence of transformers' modules, and the CPU
path), ``kernel.py`` the Triton kernels, ``ops.py`` its host glue with the same
signatures.
"""
