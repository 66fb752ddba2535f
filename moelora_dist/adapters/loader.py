"""``load_adapter``: a PEFT adapter directory -> :class:`CanonicalAdapter`, in one place.

Pipeline: find files (refuse pickles) -> read ``adapter_config.json`` -> read safetensors ->
classify every key (:mod:`keys`) -> convert each MoE layer and dense module
(:mod:`formats`, :mod:`peft_params`) -> shared-outer per layer (:mod:`shared_outer`) ->
validate shapes against the model config and max rank, and values (finite, bounded) once
(:mod:`validate`). Every file is read through :mod:`moelora_dist.files`, so an OS or format
error is an :class:`AdapterError` naming the file and the real cause.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections import defaultdict
from pathlib import Path

import torch
from tqdm.auto import tqdm

from moelora_dist.adapters.canonical import CanonicalAdapter, LoRAFactors, MoELayerLoRA
from moelora_dist.adapters.config import LoRAConfigView, ModelDims
from moelora_dist.adapters.errors import AdapterError
from moelora_dist.adapters.formats import (Ctx, checked_scale, convert_expert_projection,
                                           split_gate_up)
from moelora_dist.adapters.keys import ParsedKey, parse_key
from moelora_dist.adapters.peft_params import convert_params
from moelora_dist.adapters.shared_outer import apply_shared_outer
from moelora_dist.adapters.validate import check_values, validate
from moelora_dist.errors import FileError
from moelora_dist.files.paths import kind_of, read_json_object
from moelora_dist.files.safetensors_io import load_all, pickled_files

log = logging.getLogger(__name__)

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
_KIND = {"missing": "does not exist", "denied": "permission denied",
         "loop": "is a symbolic link loop", "other": "is not a regular file",
         "dir": "is a directory, not a file", "file": "is a file"}


def _find_files(path: Path) -> tuple[Path, Path]:
    kind = kind_of(path)
    if kind != "dir":
        raise AdapterError(f"{path}: {'not a directory' if kind == 'file' else _KIND[kind]}; "
                           f"expected a PEFT adapter directory holding {CONFIG_NAME} and "
                           f"{WEIGHTS_NAME}")
    config, weights = path / CONFIG_NAME, path / WEIGHTS_NAME
    w_kind = kind_of(weights)
    if w_kind != "file":
        if w_kind == "missing":
            try:
                names = sorted(p.name for p in path.iterdir())
            except OSError:
                names = []
            shards = [n for n in names if n.startswith("adapter_model") and (
                n.endswith(".safetensors") or n.endswith(".index.json"))]
            if shards:
                raise AdapterError(f"{path}: a sharded adapter ({', '.join(shards[:3])}) is not "
                                   f"supported; save it as one {WEIGHTS_NAME} "
                                   "(save_pretrained(..., max_shard_size='100GB'))")
            pickles = pickled_files(path)
            if pickles:
                raise AdapterError(f"{path}: only pickled weights ({', '.join(pickles)}); they "
                                   "are never unpickled (arbitrary code execution). Convert "
                                   f"them to {WEIGHTS_NAME} with safetensors in a trusted "
                                   "environment")
            raise AdapterError(f"{path}: missing {WEIGHTS_NAME}")
        raise AdapterError(f"{weights}: {_KIND[w_kind]}; expected the adapter's weights file")
    c_kind = kind_of(config)
    if c_kind == "missing":
        raise AdapterError(f"{path}: missing {CONFIG_NAME} (needed for r, lora_alpha and "
                           "target_parameters); save the adapter with PEFT's save_pretrained")
    if c_kind != "file":
        raise AdapterError(f"{config}: {_KIND[c_kind]}; expected the adapter's config file")
    return config, weights


def read_adapter_config(path: str | os.PathLike) -> LoRAConfigView:
    """Read and validate ``adapter_config.json`` of an adapter directory (cheap: no weights),
    so a command can refuse a bad adapter before it loads a model."""
    config_file, _ = _find_files(Path(path))
    try:
        raw = read_json_object(config_file, "adapter config")
    except FileError as exc:
        raise AdapterError(str(exc)) from None
    return LoRAConfigView.from_dict(raw, str(config_file))


def load_adapter(path: str | os.PathLike, *, model_config: dict | None = None,
                 max_rank: int | None = None, strict: bool = True,
                 force_shared_outer: bool | None = None,
                 name: str | None = None) -> CanonicalAdapter:
    """Load and normalize a PEFT LoRA adapter directory (every format in ``docs/adapters.md``).

    Args:
        path: directory with ``adapter_config.json`` and ``adapter_model.safetensors``.
        model_config: the model's parsed ``config.json``; when given, shapes, expert count and
            layer indices are checked against it (and it settles ambiguous orientations).
        max_rank: the pool's max rank; a larger rank is refused.
        strict: refuse keys that are not understood (False: warn, list and ignore them).
        force_shared_outer: None detects per layer, True requires shared-outer, False expands.
        name: the adapter's name (default: the directory name).
    Returns:
        :class:`CanonicalAdapter` whose tensors keep the checkpoint dtype; ``a: [Ea, r, in]``,
        ``b: [Eb, out, r]`` (see ``canonical.py``).
    Raises:
        AdapterError: with the file, layer, key and expected vs found shape.
    """
    path = Path(path)
    config_file, weights_file = _find_files(path)
    file = str(weights_file)
    cfg = read_adapter_config(path)
    raw_cfg = cfg.raw
    dims = ModelDims.from_config(model_config)
    if max_rank is not None and (not isinstance(max_rank, int) or max_rank <= 0):
        raise AdapterError(f"max_rank={max_rank!r}; it must be a positive integer")
    try:
        tensors = load_all(weights_file, "adapter weights")
    except FileError as exc:
        raise AdapterError(str(exc)) from None
    for key, t in sorted(tensors.items()):
        if not t.is_floating_point():
            raise AdapterError(f"{file}: key {key!r} has dtype {t.dtype}; LoRA factors must be "
                               "floating point (float32, bfloat16, float16)")
    ctx = Ctx(file, cfg, dims)

    params: dict[int, dict[int, dict]] = defaultdict(lambda: defaultdict(dict))
    experts_module: dict[int, str] = {}
    projs: dict[tuple[int, str], list] = defaultdict(list)
    dense: dict[str, dict[str, tuple[ParsedKey, torch.Tensor]]] = defaultdict(dict)
    unknown: list[str] = []
    for key in sorted(tensors):
        pk = parse_key(key)
        if pk.kind == "param":
            params[pk.layer][pk.depth][pk.factor] = (pk, tensors[key])
            experts_module[pk.layer] = pk.experts_module
        elif pk.kind == "expert":
            projs[(pk.layer, pk.proj)].append((pk, tensors[key]))
        elif pk.kind == "dense":
            dense[pk.path][pk.factor] = (pk, tensors[key])
        else:
            unknown.append(key)
    if unknown:
        msg = (f"{file}: {len(unknown)} key(s) that are not LoRA factors this loader understands: "
               f"{unknown[:8]}{' ...' if len(unknown) > 8 else ''}")
        if strict:
            raise AdapterError(msg + "; see docs/adapters.md for the accepted key names "
                               "(`moelora-dist inspect-adapter --no-strict DIR` lists them; "
                               "strict=False in the API ignores them)")
        warnings.warn(msg + "; ignored (strict=False)", stacklevel=2)

    sources: dict = {}
    formats: dict[int, set[str]] = defaultdict(set)
    moe: dict[int, MoELayerLoRA] = {}
    layers = sorted(set(params) | {l for l, _ in projs})
    # disable=None: a bar on a terminal only, silent in CI logs and pipes.
    for layer in tqdm(layers, desc=f"adapter {name or path.name}", unit="layer", disable=None,
                      leave=False):
        got: dict[str, LoRAFactors] = {}
        if layer in params:
            if any(l == layer for l, _ in projs):
                k = next(pk.key for (l, _), es in projs.items() if l == layer for pk, _ in es)
                raise ctx.fail(layer, k, "both target_parameters keys (experts.lora_*) and "
                               "expert projection keys for this layer; keep one format")
            got, legacy, keys = convert_params(ctx, layer, experts_module[layer], params[layer],
                                               dims.num_experts)
            legacy_note = " (peft<=0.18 transposed)" if legacy else ""
            formats[layer].add("peft-target-parameters" + legacy_note)
            sources.update({(layer, p, f): k[f] for p, k in keys.items() for f in "AB"})
        else:
            E = dims.num_experts or _infer_experts(projs, layer)
            got = _convert_projection_layer(ctx, layer, projs, E, sources, formats[layer])
        E = dims.num_experts or max(max(f.a.shape[0], f.b.shape[0]) for f in got.values())
        for p, f in got.items():
            for side, t in (("lora_A", f.a), ("lora_B", f.b)):
                if t.shape[0] not in (1, E):
                    raise ctx.fail(layer, sources[(layer, p, side[-1])], f"expert count mismatch: "
                                   f"{p} {side} has {t.shape[0]} experts, other projections {E}")
        layer_lora = MoELayerLoRA(num_experts=E, **got)
        moe[layer] = apply_shared_outer(layer_lora, layer, force_shared_outer, file)

    dense_out: dict[str, LoRAFactors] = {}
    for p, fac in sorted(dense.items()):
        for f in "AB":
            if f not in fac:
                other = next(iter(fac.values()))[0]
                raise ctx.fail(other.layer, other.key, f"lora_{f} of module {p!r} is missing")
        (pa, A), (_, B) = fac["A"], fac["B"]
        if A.ndim != 2 or B.ndim != 2 or A.shape[0] != B.shape[1]:
            raise ctx.fail(pa.layer, pa.key, f"dense LoRA needs lora_A [r, in] and lora_B [out, r] "
                           f"of one rank; found {tuple(A.shape)} and {tuple(B.shape)}")
        # A LoRA on a 2-D parameter (the router's ``gate.weight`` in target_parameters, as
        # PEFT's all-linear writes it) takes its rank_pattern / alpha_pattern key from the
        # parameter's name, like the experts' parameters.
        module = (f"{pa.module}.weight" if cfg.targets_parameter(pa.module, "weight")
                  else pa.module)
        scale = checked_scale(ctx, pa.layer, pa.key, module, A.shape[0])
        dense_out[p] = LoRAFactors(a=A.unsqueeze(0), b=B.unsqueeze(0), scaling=scale)
        sources[(p, "A")], sources[(p, "B")] = pa.key, fac["B"][0].key

    fmt = sorted({f for fs in formats.values() for f in fs}) or ["dense-only"]
    layer_formats = {l: " + ".join(sorted(fs)) for l, fs in formats.items()}
    adapter = CanonicalAdapter(name=name or path.name, moe=moe, dense=dense_out,
                               format=" + ".join(fmt), source=str(path), config=raw_cfg,
                               layer_formats=layer_formats)
    validate(adapter, dims, max_rank, sources, file)
    if not adapter.moe and not adapter.dense:
        raise AdapterError(f"{file}: no LoRA factors found")
    check_values(adapter, file, sources)
    log.debug("loaded adapter %s: %s, %d MoE layers, %d dense modules", adapter.name,
              adapter.format, len(moe), len(dense_out))
    return adapter


def _convert_projection_layer(ctx: Ctx, layer: int, projs: dict, E: int, sources: dict,
                              formats: set[str]) -> dict[str, LoRAFactors]:
    """The expert-projection keys of one layer -> ``{gate|up|down: factors}``; records the
    checkpoint keys of each factor in ``sources`` and the layouts seen in ``formats``."""
    got: dict[str, LoRAFactors] = {}
    for (l, p), entries in sorted(projs.items()):
        if l != layer:
            continue
        f = convert_expert_projection(ctx, layer, entries, E)
        keys = {fac: next(pk.key for pk, _ in entries if pk.factor == fac) for fac in "AB"}
        names = {pk.proj_name for pk, _ in entries}
        styles = {"per-expert" if pk.expert is not None else "stacked" for pk, _ in entries}
        formats.add(("mixtral w1/w3/w2 " if names & {"w1", "w2", "w3"} else "")
                    + "/".join(sorted(styles)))
        if p == "gate_up":
            if ctx.dims.expert_layout == "interleaved":
                raise ctx.fail(layer, entries[0][0].key, "a gate_up_proj LoRA in the expert-"
                               "projection format on gpt-oss's interleaved experts: its row "
                               "order is ambiguous; save the adapter with PEFT "
                               "target_parameters, or as separate gate_proj / up_proj keys")
            if (layer, "gate") in projs or (layer, "up") in projs:
                raise ctx.fail(layer, entries[0][0].key, "gate_up_proj keys together with "
                               "separate gate/up keys; keep one")
            got["gate"], got["up"] = split_gate_up(ctx, layer, keys["B"], f)
            for q in ("gate", "up"):
                sources.update({(layer, q, fac): keys[fac] for fac in "AB"})
        else:
            got[p] = f
            sources.update({(layer, p, fac): keys[fac] for fac in "AB"})
    return got


def _infer_experts(projs: dict, layer: int) -> int:
    """E of one layer without a model config: the largest expert index or stack size seen."""
    n = 1
    for (l, _), entries in projs.items():
        if l != layer:
            continue
        for pk, t in entries:
            stack = t.shape[0] if t.ndim == 3 else 1
            n = max(n, pk.expert + 1 if pk.expert is not None else stack)
    return n
