"""Align: sort (token, k) pairs (and tokens) into blocks of one expert / virtual expert.

``common.py`` (the ``Alignment`` record, worst-case sizes) and ``naive.py`` import no Triton;
``ops.py`` launches the kernels of ``kernel.py``.
"""
