"""Block-FP8 linear algebra: weights in e4m3 with 128x128 scales, activations quantized per
token and 128 columns at run time. ``naive.py`` (references and the CPU path), ``kernel.py``
(Triton: the dense linear, and the in-tile quantize-and-dot the MoE GEMMs share), ``ops.py``."""
