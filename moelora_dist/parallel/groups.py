"""Process groups from the torchrun environment, named after the rank layout.

    groups = init_parallel(tp=4, ep=2)   # under torchrun --nproc-per-node 4
    groups.tp_group, groups.ep_group, groups.moe_tp_group, groups.dp_group

The layout is validated (:class:`~moelora_dist.parallel.layout.Layout`) before any process
group exists, so a wrong ``(tp, ep)`` fails on every rank with the same message and nothing to
tear down. Every group is made with ``new_group`` from ``Layout``'s rank lists (MoE-TP
contiguous, EP strided by ``moe_tp``, TP = one DP replica, DP = one TP position across
replicas) and gets the job's timeout (``timeout_s``, else ``$MOELORA_DIST_TIMEOUT``, else
120 s; :mod:`~moelora_dist.parallel.launch_env`), so a rank that never joins a collective
fails every peer waiting on it after that many seconds, on any group. Every collective in this
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

from moelora_dist.parallel import launch_env
from moelora_dist.parallel.layout import Layout, LayoutError, RankLayout

log = logging.getLogger(__name__)

BACKEND_ENV = launch_env.BACKEND_ENV
_CACHE: dict[tuple[int, int], "ParallelGroups"] = {}
_OWN_DEFAULT_PG = False
# group_desc -> global ranks of every group made here. Kept after destroy_parallel (which empties
# torch's own registry), so that an error raised in a collective can still name its group's
# ranks once the job's ``finally`` has torn the groups down (launch/bootstrap.py reads it).
_RANKS_BY_DESC: dict[str, list[int]] = {}


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
    choice = backend or launch_env.backend_from_env() or launch_env.backend_for_device(device_type)
    if choice not in ("gloo", "nccl"):
        raise ValueError(f"unknown backend {choice!r}; use 'gloo' (CPU) or 'nccl' (CUDA)")
    if choice == "nccl" and device_type != "cuda":
        raise ValueError("backend 'nccl' needs CUDA devices; use gloo on CPU")
    return choice


def _default_device_type(backend: str | None) -> str:
    wanted = backend or launch_env.backend_from_env()
    if wanted == "gloo":
        return "cpu"
    return "cuda" if torch.cuda.is_available() else "cpu"


def dp_groups(layout: Layout) -> list[list[int]]:
    """One list per TP position: the ranks holding the same shard in every DP replica."""
    return [[d * layout.tp + t for d in range(layout.dp)] for t in range(layout.tp)]


def _make_family(layout: Layout, lists: list[list[int]], name: str, timeout: timedelta):
    """``new_group`` for every rank list, in order; returns this rank's group.

    Collective over the world: every rank makes every group of the family (the default
    ``new_group`` synchronizes the world), keeps its own. ``group_desc`` (``"ep1_tp4ep2"``: the
    second EP group of layout tp=4, ep=2) names the group in backend logs and error reports;
    several layouts of one world coexist, hence the layout in the name."""
    rank = dist.get_rank()
    mine = None
    for i, ranks in enumerate(lists):
        desc = f"{name}{i}_tp{layout.tp}ep{layout.ep}"
        g = dist.new_group(ranks, timeout=timeout, group_desc=desc)
        _RANKS_BY_DESC[desc] = list(ranks)
        if rank in ranks:
            mine = g
    return mine


def group_ranks(group) -> list[int] | None:
    """Global ranks of ``group`` (None: the world), also after :func:`destroy_parallel` for
    the groups made here; None when unknown."""
    try:
        return dist.get_process_group_ranks(group if group is not None else dist.group.WORLD)
    except Exception:  # destroyed (torch forgot it) or not a group
        pass
    world = _env_int("WORLD_SIZE", 1)
    try:
        if group is None or group.size() == world:  # the world, or a group as large
            return list(range(world))
    except Exception:
        return None
    return _RANKS_BY_DESC.get(getattr(group, "group_desc", None))


def build_groups(layout: Layout, device: torch.device, backend: str,
                 timeout_s: float) -> ParallelGroups:
    """Make the named groups of ``layout`` over the initialized default group, each with a
    ``timeout_s`` timeout on its collectives.

    Collective: every rank of the world must call it with the same layout, in the same order.
    """
    timeout = timedelta(seconds=timeout_s)
    rank = dist.get_rank()
    groups = ParallelGroups(
        layout=layout, rank_layout=RankLayout(layout, rank), device=device, backend=backend,
        tp_group=_make_family(layout, layout.tp_groups, "tp", timeout),
        ep_group=_make_family(layout, layout.ep_groups, "ep", timeout),
        moe_tp_group=_make_family(layout, layout.moe_tp_groups, "moe_tp", timeout),
        dp_group=_make_family(layout, dp_groups(layout), "dp", timeout))
    c = groups.rank_layout.coords
    # Each group must be the one the integer layout gives this rank's coordinates (indexed from
    # the coordinates, not from the membership test above); a mismatch would silently mis-slice
    # weights.
    assert dist.get_process_group_ranks(groups.tp_group) == layout.tp_groups[c.dp_rank]
    assert dist.get_process_group_ranks(groups.moe_tp_group) == layout.moe_tp_groups[
        c.dp_rank * layout.ep + c.moe_ep_rank]
    assert dist.get_process_group_ranks(groups.ep_group) == layout.ep_groups[
        c.dp_rank * layout.moe_tp + c.moe_tp_rank]
    assert dist.get_process_group_ranks(groups.dp_group) == dp_groups(layout)[c.tp_rank]
    return groups


def node_split_warning(layout: Layout, local_world_size: int) -> str | None:
    """Why the TP groups of ``layout`` cross nodes of ``local_world_size`` processes, or None.

    Ranks are numbered node-major by torchrun and TP groups are contiguous runs of ``tp``
    ranks, so every TP group lies inside one node exactly when ``tp`` divides the processes per
    node (a single node always fits)."""
    if layout.world_size <= local_world_size or local_world_size % layout.tp == 0:
        return None
    why = ("tp is larger than the processes per node" if layout.tp > local_world_size
           else "tp does not divide the processes per node")
    return (f"tp={layout.tp} with {local_world_size} processes per node: {why}, so TP groups "
            f"span nodes and every TP all-reduce crosses the network; pick tp from "
            f"{[d for d in range(1, local_world_size + 1) if local_world_size % d == 0]} to "
            f"keep each TP group inside one node")


def init_parallel(tp: int, ep: int = 1, *, backend: str | None = None,
                  timeout_s: float | None = None) -> ParallelGroups:
    """Process groups for ``(tp, ep)`` from ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``.

    Validates ``Layout(WORLD_SIZE, tp, ep)`` first (raises :class:`LayoutError` before any
    group is built), sets the CUDA device of ``LOCAL_RANK`` before ``init_process_group``, and
    uses ``timeout_s`` (default ``$MOELORA_DIST_TIMEOUT``, else 120) for every collective so
    that a dead rank cannot hang the others forever (the default group and every group built
    here). Rank 0 logs a warning when the TP groups cross nodes (:func:`node_split_warning`,
    from ``LOCAL_WORLD_SIZE``).
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
    timeout_s = launch_env.timeout_s(timeout_s)
    if not dist.is_initialized():
        kwargs = {"device_id": device} if device_type == "cuda" else {}
        dist.init_process_group(chosen, timeout=timedelta(seconds=timeout_s), **kwargs)
        _OWN_DEFAULT_PG = True
    elif dist.get_world_size() != world:
        raise LayoutError(f"the default process group has {dist.get_world_size()} ranks but "
                          f"WORLD_SIZE={world}")
    groups = build_groups(layout, device, chosen, timeout_s)
    _CACHE[key] = groups
    if groups.is_rank0:
        log.info("parallel groups ready: %s backend=%s timeout=%gs", layout, chosen, timeout_s)
        warning = node_split_warning(layout, _env_int("LOCAL_WORLD_SIZE", world))
        if warning:
            log.warning(warning)
    return groups


def destroy_parallel() -> None:
    """Destroy every group this module made (and the default one if it made it)."""
    global _OWN_DEFAULT_PG
    _CACHE.clear()
    if dist.is_initialized() and _OWN_DEFAULT_PG:
        dist.destroy_process_group()
    _OWN_DEFAULT_PG = False
# group_desc -> global ranks of every group made here. Kept after destroy_parallel (which empties
# torch's own registry), so that an error raised in a collective can still name its group's
# ranks once the job's ``finally`` has torn the groups down (launch/bootstrap.py reads it).
_RANKS_BY_DESC: dict[str, list[int]] = {}


def group_size(group) -> int:
    """Size of ``group``; 1 for None (single process)."""
    return 1 if group is None else dist.get_world_size(group)
