"""Read one rank's slice of a MoE layer's base weights from safetensors, and nothing more.

Legend: E experts, E_l local experts, H hidden, I intermediate, I_l local intermediate.

Each rank opens the checkpoint with ``safe_open`` and reads only its experts and its ``I``
rows/columns through ``get_slice``; the full expert tensors are never materialized. Accepted
key layouts under a layer prefix such as ``model.layers.3.mlp``:

    fused 3-D (transformers 5):  {p}.experts.gate_up_proj [E, 2I, H]   (gate rows, then up)
                                 {p}.experts.down_proj    [E, H, I]
    per expert (Qwen3-MoE, OLMoE): {p}.experts.{e}.gate_proj.weight [I, H], up_proj [I, H],
                                 down_proj [H, I]
    per expert (Mixtral):        {p}.experts.{e}.w1.weight (gate), w3 (up), w2 (down)
    router:                      {p}.gate.weight [E, H]

A checkpoint is a ``.safetensors`` file, or a directory of them (sharded checkpoints with
``model.safetensors.index.json`` included). Only safetensors; nothing is ever unpickled.
"""

from __future__ import annotations

import json
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from moelora_dist.parallel.layout import MoEShard

PER_EXPERT_NAMES = {  # style -> (gate, up, down) module names under experts.{e}
    "per_expert": ("gate_proj", "up_proj", "down_proj"),
    "mixtral": ("w1", "w3", "w2"),
}


@dataclass
class RankMoEWeights:
    """``router_EH [E, H]``, ``w_gate_up [E_l, 2*I_l, H]``, ``w_down [E_l, H, I_l]``."""

    router_EH: torch.Tensor
    w_gate_up: torch.Tensor
    w_down: torch.Tensor
    key_style: str


class SafetensorsIndex:
    """Key -> file map over one file or a directory of ``*.safetensors`` files."""

    def __init__(self, path: str | Path):
        path = Path(path)
        if path.is_dir():
            files = sorted(path.glob("*.safetensors"))
            if not files:
                pickled = [p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth")]
                hint = (f" (found pickled {pickled}: convert them to safetensors; they are "
                        f"never unpickled)") if pickled else ""
                raise FileNotFoundError(f"no *.safetensors file in {path}{hint}")
        elif path.suffix == ".safetensors" and path.is_file():
            files = [path]
        else:
            raise FileNotFoundError(f"{path} is neither a .safetensors file nor a directory "
                                    f"holding some")
        self.path = path
        self.key_to_file: dict[str, Path] = {}
        for f in files:
            with safe_open(str(f), framework="pt") as h:
                for k in h.keys():
                    self.key_to_file[k] = f
        self._stack = ExitStack()
        self._handles: dict[Path, object] = {}

    def __contains__(self, key: str) -> bool:
        return key in self.key_to_file

    def _handle(self, key: str):
        if key not in self.key_to_file:
            raise KeyError(f"{key!r} is not in {self.path}")
        f = self.key_to_file[key]
        if f not in self._handles:
            self._handles[f] = self._stack.enter_context(safe_open(str(f), framework="pt"))
        return self._handles[f]

    def shape(self, key: str) -> list[int]:
        return list(self._handle(key).get_slice(key).get_shape())

    def get_slice(self, key: str, index) -> torch.Tensor:
        """``tensor[index]`` read from disk without loading the rest."""
        return self._handle(key).get_slice(key)[index]

    def get(self, key: str) -> torch.Tensor:
        return self._handle(key).get_tensor(key)

    def close(self) -> None:
        self._stack.close()
        self._handles.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def detect_key_style(index: SafetensorsIndex, prefix: str) -> str:
    """``fused``, ``per_expert`` or ``mixtral``, from the keys present under ``prefix``."""
    if f"{prefix}.experts.gate_up_proj" in index:
        return "fused"
    for style, (gate, _, _) in PER_EXPERT_NAMES.items():
        if f"{prefix}.experts.0.{gate}.weight" in index:
            return style
    near = sorted(k for k in index.key_to_file if k.startswith(prefix))[:5]
    raise KeyError(f"no MoE expert weights under prefix {prefix!r} in {index.path}: expected "
                   f"{prefix}.experts.gate_up_proj, {prefix}.experts.0.gate_proj.weight or "
                   f"{prefix}.experts.0.w1.weight; keys under the prefix: {near or 'none'}")


def _check(what: str, got, want) -> None:
    if list(got) != list(want):
        raise ValueError(f"{what} has shape {list(got)}, expected {list(want)}")


def load_moe_weights(checkpoint: str | Path | SafetensorsIndex, prefix: str, shard: MoEShard,
                     *, hidden: int, router_key: str | None = None,
                     dtype: torch.dtype | None = None,
                     device: torch.device | str = "cpu") -> RankMoEWeights:
    """This rank's slice of the MoE layer under ``prefix`` (see the module docstring).

    ``shard`` comes from ``RankLayout.moe_shard(E, I)``; ``router_key`` defaults to
    ``{prefix}.gate.weight``. Raises ``KeyError`` for missing keys and ``ValueError`` for
    shapes that do not match ``(E, H, I)``.
    """
    index = checkpoint if isinstance(checkpoint, SafetensorsIndex) else SafetensorsIndex(checkpoint)
    try:
        E, I, H = shard.num_experts, shard.intermediate, hidden
        e0, e1, i0, i1 = shard.expert_start, shard.expert_end, shard.i_start, shard.i_end
        rkey = router_key or f"{prefix}.gate.weight"
        _check(rkey, index.shape(rkey), [E, H])
        router = index.get(rkey)
        style = detect_key_style(index, prefix)
        if style == "fused":
            gu_key, d_key = f"{prefix}.experts.gate_up_proj", f"{prefix}.experts.down_proj"
            _check(gu_key, index.shape(gu_key), [E, 2 * I, H])
            _check(d_key, index.shape(d_key), [E, H, I])
            # Gate and up rows are sliced separately: the rank's I range within each half.
            gate = index.get_slice(gu_key, (slice(e0, e1), slice(i0, i1)))
            up = index.get_slice(gu_key, (slice(e0, e1), slice(I + i0, I + i1)))
            gate_up = torch.cat([gate, up], dim=1)
            down = index.get_slice(d_key, (slice(e0, e1), slice(None), slice(i0, i1)))
        else:
            g_name, u_name, d_name = PER_EXPERT_NAMES[style]
            gus, downs = [], []
            for e in range(e0, e1):
                base = f"{prefix}.experts.{e}"
                for name, want in ((g_name, [I, H]), (u_name, [I, H]), (d_name, [H, I])):
                    _check(f"{base}.{name}.weight", index.shape(f"{base}.{name}.weight"), want)
                gate = index.get_slice(f"{base}.{g_name}.weight", (slice(i0, i1),))
                up = index.get_slice(f"{base}.{u_name}.weight", (slice(i0, i1),))
                gus.append(torch.cat([gate, up], dim=0))
                downs.append(index.get_slice(f"{base}.{d_name}.weight",
                                             (slice(None), slice(i0, i1))))
            gate_up, down = torch.stack(gus), torch.stack(downs)
    finally:
        if not isinstance(checkpoint, SafetensorsIndex):
            index.close()
    out = [router, gate_up, down]
    out = [t.to(device=device, dtype=dtype or t.dtype).contiguous() for t in out]
    return RankMoEWeights(*out, key_style=style)


def read_config(directory: str | Path) -> dict:
    """``config.json`` of a checkpoint directory."""
    p = Path(directory) / "config.json"
    if not p.is_file():
        raise FileNotFoundError(f"no config.json in {directory}")
    return json.loads(p.read_text())
