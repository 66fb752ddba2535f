"""Batch info: per-token adapter slot and per-slot enabled flags, from per-request segments.

``naive.py`` is the reference (and the CPU path), ``ops.py`` the one-launch Triton version
with the same signature; :func:`moelora_dist.lora.batch_info.build_batch_info` picks one.
"""
