"""Dispatch: pack tokens into byte rows by destination, unpack them, sum the returned copies.

``wire.py`` (the row format and where each destination's rows go) and ``naive.py`` (the
PyTorch references, also the CPU path) import no Triton; ``ops.py`` launches the kernels of
``kernel.py`` with the references' signatures. The dispatcher that runs the collectives around
them is :mod:`moelora_dist.moe.dispatch.all_to_all_fixed`.
"""
