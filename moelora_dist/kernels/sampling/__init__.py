"""Sampling one token per row on the device: a counter-based random number per (seed, step,
vocabulary index), Gumbel-max over the tokens a row keeps, and the log-sum-exp for logprobs.

``naive.py`` is the PyTorch reference (and the CPU path), ``kernel.py`` the Triton kernels,
``ops.py`` their launcher, ``filters.py`` the top-k / top-p thresholds (PyTorch, both paths),
``common.py`` the hash constants they share.
"""
