"""``moelora-dist layout``: print which global rank plays which role.

    moelora-dist layout --world 8 --tp 8 --ep 2 --experts 128 --intermediate 768
"""

from __future__ import annotations

import argparse

from moelora_dist.errors import OptionError
from moelora_dist.parallel.layout import Layout


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--world", type=int, required=True, help="number of processes")
    p.add_argument("--tp", type=int, required=True, help="tensor-parallel degree")
    p.add_argument("--ep", type=int, default=1, help="expert-parallel degree (divides tp)")
    p.add_argument("--experts", type=int, default=None, help="experts per MoE layer")
    p.add_argument("--intermediate", type=int, default=None, help="expert intermediate size I")


def format_table(layout: Layout, experts: int | None, intermediate: int | None) -> str:
    header = ["rank", "dp_rank", "tp_rank", "moe_ep_rank", "moe_tp_rank"]
    if experts is not None and intermediate is not None:
        layout.check_model(experts, intermediate)
        header += ["experts", "I rows"]
    rows = []
    for r in range(layout.world_size):
        c = layout.coords(r)
        row = [r, c.dp_rank, c.tp_rank, c.moe_ep_rank, c.moe_tp_rank]
        if len(header) > 5:
            s = layout.moe_shard(r, experts, intermediate)
            row += [f"[{s.expert_start}, {s.expert_end})", f"[{s.i_start}, {s.i_end})"]
        rows.append([str(v) for v in row])
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(header)]
    lines = [str(layout), "  ".join(h.rjust(w) for h, w in zip(header, widths))]
    lines += ["  ".join(v.rjust(w) for v, w in zip(row, widths)) for row in rows]
    lines.append(f"TP groups:     {layout.tp_groups}")
    lines.append(f"EP groups:     {layout.ep_groups}")
    lines.append(f"MoE-TP groups: {layout.moe_tp_groups}")
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    if (args.experts is None) != (args.intermediate is None):
        raise OptionError("give --experts and --intermediate together")
    layout = Layout(args.world, args.tp, args.ep)
    print(format_table(layout, args.experts, args.intermediate))
    return 0
