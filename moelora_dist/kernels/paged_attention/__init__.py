"""Paged attention: keys and values live in fixed-size pages read through per-sequence block
tables, for decode and for chunked prefill in one kernel, plus the kernel that writes a step's
new keys and values into their pages (with the per-head q/k norm and rotary embedding fused).

``naive.py`` is the reference (and the CPU path), ``kernel.py`` the Triton kernels, ``ops.py``
their host glue with the same signatures.
"""
