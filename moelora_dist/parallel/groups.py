"""Process groups from the torchrun environment, named after the rank layout.

    groups = init_parallel(tp=4, ep=2)   # under torchrun --nproc-per-node 4
    groups.tp_group, groups.ep_group, groups.moe_tp_group, groups.dp_group

The layout is validated (:class:`~moelora_dist.parallel.layout.Layout`) before any process
group exists, so a wrong ``(tp, ep)`` fails on every rank with the same message and nothing to
tear down. Groups come from the public ``init_device_mesh`` with mesh dims
``("dp", "ep", "moe_tp")`` over ranks laid out as in ``layout.py`` (MoE-TP innermost), so the
mesh's ``moe_tp`` groups are contiguous and its ``ep`` groups strided by ``moe_tp``; the TP
group (``ep x moe_tp`` of one DP replica) is made with ``new_group``. Every collective in this
package takes one of these groups explicitly; nothing relies on the implicit world group.

``init_parallel`` is idempotent: the default process group is made once per process, and the
groups of each ``(tp, ep)`` once (cached), so one launch can test several layouts of the same
world size. ``destroy_parallel`` tears everything down; call it in a ``finally``.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from moelora_dist.parallel.layout import Layout, LayoutError, RankLayout

log = logging.getLogger(__name__)

BACKEND_ENV = "MOELORA_DIST_BACKEND"
_CACHE: dict[tuple[int, int], "ParallelGroups"] = {}
_OWN_DEFAULT_PG = False


@dataclass
class ParallelGroups:
    """The groups of one layout, seen from one rank. Groups are None on a single process."""

    layout: Layout
    rank_layout: RankLayout
    device: torch.device
    backend: str
    tp_group: object | None = None
    ep_group: object | None = None
    moe_tp_group: object | None = None
    dp_group: object | None = None
    mesh: object | None = None

    @classmethod
    def single(cls, device: str | torch.device = "cpu") -> "ParallelGroups":
        """One process, no torch.distributed: every collective is skipped."""
        return cls(Layout(1, 1, 1), RankLayout.single(), torch.device(device), "none")

    @property
    def rank(self) -> int:
        return self.rank_layout.rank

    @property
    def tp_size(self) -> int:
        return self.layout.tp

    @property
    def ep_size(self) -> int:
        return self.layout.ep

    @property
    def moe_tp_size(self) -> int:
        return self.layout.moe_tp

    @property
    def is_rank0(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def pick_backend(device_type: str, backend: str | None = None) -> str:
    """``backend`` argument, else ``$MOELORA_DIST_BACKEND``, else NCCL on CUDA / gloo on CPU."""
    choice = backend or os.environ.get(BACKEND_ENV) or ("nccl" if device_type == "cuda" else "gloo")
    if choice not in ("gloo", "nccl"):
        raise ValueError(f"unknown backend {choice!r}; use 'gloo' (CPU) or 'nccl' (CUDA)")
    if choice == "nccl" and device_type != "cuda":
        raise ValueError("backend 'nccl' needs CUDA devices; use gloo on CPU")
    return choice


def _default_device_type(backend: str | None) -> str:
    wanted = backend or os.environ.get(BACKEND_ENV)
    if wanted == "gloo":
        return "cpu"
    return "cuda" if torch.cuda.is_available() else "cpu"


def build_groups(layout: Layout, device: torch.device, backend: str) -> ParallelGroups:
    """Make the mesh and named groups of ``layout`` over the initialized default group.

    Collective: every rank of the world must call it with the same layout, in the same order.
    """
    rank = dist.get_rank()
    mesh = dist.device_mesh.init_device_mesh(
        device.type, (layout.dp, layout.ep, layout.moe_tp), mesh_dim_names=("dp", "ep", "moe_tp"))
    tp_group = None
    # new_group is collective over the world: every rank creates every TP group, keeps its own.
    for ranks in layout.tp_groups:
        g = dist.new_group(ranks)
        if rank in ranks:
            tp_group = g
    groups = ParallelGroups(
        layout=layout, rank_layout=RankLayout(layout, rank), device=device, backend=backend,
        tp_group=tp_group, ep_group=mesh.get_group("ep"), moe_tp_group=mesh.get_group("moe_tp"),
        dp_group=mesh.get_group("dp"), mesh=mesh)
    c = groups.rank_layout.coords
    # The mesh must agree with the integer layout; a mismatch would silently mis-slice weights.
    assert dist.get_process_group_ranks(groups.moe_tp_group) == layout.moe_tp_groups[
        c.dp_rank * layout.ep + c.moe_ep_rank]
    assert dist.get_process_group_ranks(groups.ep_group) == layout.ep_groups[
        c.dp_rank * layout.moe_tp + c.moe_tp_rank]
    return groups


def init_parallel(tp: int, ep: int = 1, *, backend: str | None = None,
                  timeout_s: float | None = None) -> ParallelGroups:
    """Process groups for ``(tp, ep)`` from ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``.

    Validates ``Layout(WORLD_SIZE, tp, ep)`` first (raises :class:`LayoutError` before any
    group is built), sets the CUDA device of ``LOCAL_RANK`` before ``init_process_group``, and
    uses ``timeout_s`` (default ``$MOELORA_DIST_TIMEOUT``, else 120) for every collective so
    that a dead rank cannot hang the others forever.
    Without a torchrun environment and with ``tp == ep == 1`` it returns
    :meth:`ParallelGroups.single` on the default device.
    """
    global _OWN_DEFAULT_PG
    world = _env_int("WORLD_SIZE", 1)
    layout = Layout(world, tp, ep)  # raises LayoutError with the fix, before anything exists
    device_type = _default_device_type(backend)
    if "RANK" not in os.environ and not dist.is_initialized():
        if world != 1:
            raise LayoutError("WORLD_SIZE is set but RANK is not; launch with torchrun or "
                              "`python -m launch --nproc-per-node N ...`")
        return ParallelGroups.single(
            torch.device("cuda", torch.cuda.current_device()) if device_type == "cuda" else "cpu")
    key = (tp, ep)
    if key in _CACHE:
        return _CACHE[key]
    chosen = pick_backend(device_type, backend)
    local_rank = _env_int("LOCAL_RANK", 0)
    if device_type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if timeout_s is None:
        timeout_s = float(os.environ.get("MOELORA_DIST_TIMEOUT", 120))
    if not dist.is_initialized():
        kwargs = {"device_id": device} if device_type == "cuda" else {}
        dist.init_process_group(chosen, timeout=timedelta(seconds=timeout_s), **kwargs)
        _OWN_DEFAULT_PG = True
    elif dist.get_world_size() != world:
        raise LayoutError(f"the default process group has {dist.get_world_size()} ranks but "
                          f"WORLD_SIZE={world}")
    groups = build_groups(layout, device, chosen)
    _CACHE[key] = groups
    if groups.is_rank0:
        log.info("parallel groups ready: %s backend=%s", layout, chosen)
    return groups


def destroy_parallel() -> None:
    """Destroy every group this module made (and the default one if it made it)."""
    global _OWN_DEFAULT_PG
    _CACHE.clear()
    if dist.is_initialized() and _OWN_DEFAULT_PG:
        dist.destroy_process_group()
    _OWN_DEFAULT_PG = False


def group_size(group) -> int:
    """Size of ``group``; 1 for None (single process)."""
    return 1 if group is None else dist.get_world_size(group)
