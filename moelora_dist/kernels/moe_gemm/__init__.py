"""Grouped GEMMs of the MoE layer with multi-LoRA: shrink, gate_up, down, top-k sum."""
