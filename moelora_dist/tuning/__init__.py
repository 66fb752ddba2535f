"""Tile configs of the MoE LoRA kernels chosen by measurement (``moelora-dist tune-kernels``).

``problems.py`` (model shapes, inputs, reference rows), ``space.py`` (the candidates: the
heuristic and its neighbours), ``measure.py`` (check against the reference, then time a CUDA
graph replay), ``compile_pool.py`` (worker processes that compile candidates ahead of timing),
``search.py`` (phases, time budget, progress), ``output.py`` (the JSON file that
:mod:`moelora_dist.kernels.moe_lora.tuned` reads). ``docs/tuning.md`` describes it all.
"""
