"""Read a rank's slice of a block-FP8 weight (e4m3 + ``weight_scale_inv``) and check it.

Legend: N output rows, K input columns, Nb / Kb scale rows / columns (``ceil(. / 128)``).

    w = read_linear(reader, cfg, "model.layers.0.self_attn.q_proj", rows=(0, 512),
                    dtype=torch.bfloat16, expect_shape=(4096, 2048))
    # -> torch.Tensor for a bf16 weight, BlockFP8Weight for an FP8 one (dequantized to
    #    ``dtype`` when cfg.fp8.dequantize: config.json's "dequantize" or --dequantize-fp8)

The stored dtype decides whether a module is FP8 (as in transformers); the config decides
whether it may be: an FP8 tensor in a module ``modules_to_not_convert`` excludes, or in a
checkpoint without ``quantization_config``, is refused. Per tensor, refused with one line: e5m2
weights, a missing ``weight_scale_inv``, per-tensor or per-channel scale tensors, scale grids of
other block sizes, non-finite or non-positive scales, ue8m0 scales that are not powers of two,
and a scale beside an unquantized weight.

Slicing. Columns (the input dim, cut by row-parallel layers) must start on a 128 block: the
kernels quantize activations in groups of 128 columns and a group cannot span two ranks, so
layouts that cut elsewhere are refused earlier (:func:`moelora_dist.models.fp8_layout.check`).
Rows (the output dim, cut by column-parallel layers and the gate/up halves) may start anywhere:
:func:`reblock_rows` re-blocks the scale rows so that every ``block_n`` local rows share one
scale, with ``block_n = gcd(128, every piece's start and local offset)``: exact, and for the
usual 128-aligned cuts ``block_n`` stays 128 and the scales are the stored ones.
"""

from __future__ import annotations

import math

import torch

from moelora_dist.config.model import ModelConfig, ModelConfigError
from moelora_dist.config.quant import FP8_BLOCK
from moelora_dist.kernels.block_fp8.naive import dequantize
from moelora_dist.kernels.weights_fp8 import BlockFP8Weight

FLOAT_NAMES = ("BF16", "F16", "F32", "F64")


class FP8CheckpointError(ModelConfigError):
    """An FP8 tensor (or its scale) of a kind this runtime does not serve."""


def reblock_rows(pieces: list[tuple[int, torch.Tensor]], num_rows: list[int]
                 ) -> tuple[torch.Tensor, int]:
    """Scale rows for the concatenation of row pieces cut from block-scaled weights.

    Args:
        pieces: per piece, ``(start, scale_rows)``: the piece's first row in its full weight and
            the stored scale rows ``[..., Nb_i, Kb]`` covering rows ``[start, start + n_i)``
            (i.e. stored rows ``start // 128 .. (start + n_i - 1) // 128``).
        num_rows: ``n_i`` per piece.
    Returns:
        ``(scale [..., ceil(sum n_i / block_n), Kb], block_n)``: local row ``r`` uses scale row
        ``r // block_n``.
    """
    offsets = [0]
    for n in num_rows[:-1]:
        offsets.append(offsets[-1] + n)
    block_n = FP8_BLOCK
    for (start, _), off in zip(pieces, offsets):
        block_n = math.gcd(block_n, start, off)
    out = []
    for (start, s), n in zip(pieces, num_rows):
        local = torch.arange(-(-n // block_n)) * block_n + start
        out.append(s[..., local // FP8_BLOCK - start // FP8_BLOCK, :])
    return torch.cat(out, dim=-2).contiguous(), block_n


def _scale_values(reader, skey: str, s: torch.Tensor, scale_fmt: str) -> torch.Tensor:
    """fp32 scales from the stored ones, checked (finite, > 0, powers of two for ue8m0)."""
    e8m0 = getattr(torch, "float8_e8m0fnu", None)
    if s.dtype in (torch.uint8, e8m0):
        if scale_fmt != "ue8m0":
            raise FP8CheckpointError(
                f"{skey} holds ue8m0 exponent bytes ({s.dtype}) but quantization_config "
                f"scale_fmt is {scale_fmt!r}; set scale_fmt \"ue8m0\"")
        s = torch.exp2(s.view(torch.uint8).to(torch.float32) - 127.0)
    elif s.dtype != torch.float32:
        raise FP8CheckpointError(f"{skey} is stored as {s.dtype}; weight_scale_inv must be "
                                 "float32 (or ue8m0 bytes with scale_fmt \"ue8m0\")")
    if not bool(torch.isfinite(s).all()) or not bool((s > 0).all()):
        raise FP8CheckpointError(f"{skey} has non-finite or non-positive scales; the "
                                 "checkpoint is corrupt")
    if scale_fmt == "ue8m0" and not bool((torch.frexp(s).mantissa == 0.5).all()):
        raise FP8CheckpointError(f"{skey}: scale_fmt is \"ue8m0\" but some scales are not "
                                 "powers of two; fix scale_fmt or the checkpoint")
    return s


def check_fp8_pair(reader, wkey: str, skey: str, lead: int) -> tuple[int, int]:
    """``(N, K)`` of an e4m3 weight whose scale grid is the fine-grained 128x128 one; one
    refusal line per unsupported variant. ``lead`` leading (expert) dims precede ``[N, K]``."""
    wname = reader.dtype_name(wkey)
    if wname == "F8_E5M2":
        raise FP8CheckpointError(f"{wkey} is stored as float8_e5m2; only e4m3 (float8_e4m3fn) "
                                 "FP8 weights are supported")
    if wname != "F8_E4M3":
        raise FP8CheckpointError(f"{wkey} is stored as {wname}; an FP8 weight must be "
                                 "float8_e4m3fn")
    if not reader.has(skey):
        raise FP8CheckpointError(
            f"{wkey} is FP8 but the checkpoint has no {skey} (its block scales); a weight "
            "without its scales cannot be read")
    shape, sshape = reader.shape(wkey), reader.shape(skey)
    if len(shape) != lead + 2:
        raise FP8CheckpointError(f"{wkey} has shape {shape}; expected {lead + 2} dims")
    N, K = shape[-2:]
    want = shape[:-2] + [-(-N // FP8_BLOCK), -(-K // FP8_BLOCK)]
    if sshape != want:
        if len(sshape) <= lead or all(d == 1 for d in sshape[lead:]):
            kind = "a per-tensor scale"
        elif sshape[lead:] in ([N], [N, 1]):
            kind = "per-channel (per output row) scales"
        else:
            kind = f"a scale grid of shape {sshape}"
        raise FP8CheckpointError(
            f"{skey} is {kind}, but a weight {shape} with 128x128 block scales needs "
            f"weight_scale_inv of shape {want}; only the fine-grained block layout is supported")
    return N, K


def read_block_fp8(reader, cfg: ModelConfig, pieces: list[tuple[str, int | None, int | None]],
                   *, lead: tuple = (), cols: tuple[int, int] | None = None,
                   expect_shape: tuple[int, int] | None = None) -> BlockFP8Weight:
    """This rank's part of one or more FP8 weights, rows concatenated.

    Args:
        pieces: ``(module_key, start, end)`` per row range (``None, None``: all rows), read from
            ``{module_key}.weight`` / ``.weight_scale_inv`` and concatenated in order (the gate
            rows then the up rows of a rank, from one fused tensor or two per-expert ones).
        lead: basic indices of leading dims (an expert slice of a fused 3-D tensor).
        cols: the column range (must start on a 128 block, or be all columns).
        expect_shape: ``(N, K)`` of each full weight, from the model config.
    """
    weights, scales, sizes = [], [], []
    for module_key, r0, r1 in pieces:
        wkey, skey = stored_keys(module_key)
        N, K = check_fp8_pair(reader, wkey, skey, len(lead))
        if expect_shape is not None and (N, K) != tuple(expect_shape):
            raise FP8CheckpointError(f"{wkey} has rows x columns {N} x {K}, expected "
                                     f"{expect_shape[0]} x {expect_shape[1]} from the model "
                                     "config; the config and the weights do not belong together")
        r0, r1 = (0, N) if r0 is None else (r0, r1)
        c0, c1 = cols or (0, K)
        if c0 % FP8_BLOCK or (c1 % FP8_BLOCK and c1 != K):
            raise FP8CheckpointError(
                f"{wkey}: columns [{c0}, {c1}) of {K} do not start and end on 128-column "
                "blocks; FP8 layers can only be split across ranks at block boundaries (pick a "
                "layout whose shard of this dim is a multiple of 128)")
        scols = slice(c0 // FP8_BLOCK, -(-c1 // FP8_BLOCK))
        weights.append(reader.get_raw(wkey, *lead, slice(r0, r1), slice(c0, c1)))
        s = reader.get_raw(skey, *lead, slice(r0 // FP8_BLOCK, -(-r1 // FP8_BLOCK)), scols)
        scales.append((r0, _scale_values(reader, skey, s, cfg.fp8.scale_fmt)))
        sizes.append(r1 - r0)
    scale, block_n = reblock_rows(scales, sizes)
    w = BlockFP8Weight(torch.cat(weights, dim=-2).contiguous(), scale, block_n)
    w.check()
    return w


def stored_keys(module_key: str) -> tuple[str, str]:
    """``(<m>.weight, <m>.weight_scale_inv)``; fused 3-D expert tensors are named without the
    ``.weight`` suffix (``experts.gate_up_proj`` and ``experts.gate_up_proj_scale_inv``)."""
    if module_key.endswith((".experts.gate_up_proj", ".experts.down_proj")):
        return module_key, f"{module_key}_scale_inv"
    return f"{module_key}.weight", f"{module_key}.weight_scale_inv"


def stored_fp8(reader, cfg: ModelConfig, module_key: str) -> bool:
    """Whether ``{module_key}`` is stored as FP8 (and may be); refusals as in the module doc."""
    wkey, skey = stored_keys(module_key)
    name = reader.dtype_name(wkey)
    if name in FLOAT_NAMES:
        # Without a quantization_config a stray scale is one more tensor no module places
        # (refused by CheckpointWeights.check_all_placed); with one, it is named here.
        if cfg.fp8 is not None and reader.has(skey):
            raise FP8CheckpointError(f"{skey} is present but {wkey} is stored as {name}, not "
                                     "FP8: a scale beside an unquantized weight is ambiguous")
        return False
    if cfg.fp8 is None:
        return False  # the plain reader refuses the tensor in one line, naming its dtype
    if not cfg.fp8.converts(module_key):
        raise FP8CheckpointError(
            f"{wkey} is stored as FP8 but quantization_config modules_to_not_convert excludes "
            f"{module_key} (transformers would read it unquantized); fix the config")
    return True


def read_linear(reader, cfg: ModelConfig, module_key: str, *,
                rows: tuple[int, int] | None = None, cols: tuple[int, int] | None = None,
                dtype: torch.dtype | None = None, expect_shape: tuple[int, int] | None = None):
    """One linear weight ``[N, K]`` cut to ``rows`` / ``cols``: a tensor in ``dtype``, or a
    :class:`BlockFP8Weight` for an FP8 one (dequantized to ``dtype`` when
    ``cfg.fp8.dequantize``)."""
    wkey, _ = stored_keys(module_key)
    if expect_shape is not None:
        reader.require(wkey)
        if tuple(reader.shape(wkey)) != tuple(expect_shape):
            reader.get(wkey, expect_shape=expect_shape)  # the shape error, in its one line
    if not stored_fp8(reader, cfg, module_key):
        index = [slice(*rows) if rows else slice(None)]
        if cols:
            index.append(slice(*cols))
        return reader.get(wkey, *index, dtype=dtype)
    r0, r1 = rows or (None, None)
    w = read_block_fp8(reader, cfg, [(module_key, r0, r1)], cols=cols)
    return maybe_dequantize(w, cfg, dtype)


def maybe_dequantize(w: BlockFP8Weight, cfg: ModelConfig, dtype: torch.dtype | None):
    """``w`` itself, or its values in ``dtype`` when the config says to dequantize at load."""
    if cfg.fp8 is not None and cfg.fp8.dequantize:
        return dequantize(w, torch.float32).to(dtype or torch.bfloat16)
    return w
