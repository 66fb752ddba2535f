"""The whole local-expert computation of one MoE layer with multi-LoRA, one family:
``naive.py`` (the PyTorch reference and the CPU path), ``ops.py`` (the Triton pipeline),
``configs.py`` (tile sizes per shape)."""
