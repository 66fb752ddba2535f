"""The residual add fused with the RMSNorm that follows it (``h += delta; x = norm(h)``).

``naive.py`` is the reference (and the CPU path), ``kernel.py`` the one-pass Triton kernel,
``ops.py`` its host glue with the same signature.
"""
