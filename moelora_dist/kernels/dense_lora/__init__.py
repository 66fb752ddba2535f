"""Multi-LoRA on dense linear layers (attention projections, dense MLPs), per token.

``naive.py`` is the reference and the CPU path; ``ops.py`` the Triton path (tokens sorted by
slot, each block reading only its own slot's factors); same signature.
"""
