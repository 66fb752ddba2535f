"""The one logging set-up: INFO from global rank 0, WARNING from the other ranks.

Every command and every process under the launcher calls :func:`setup_logging` once, so a job
of N processes prints one copy of each log line, prefixed with its rank.
"""

from __future__ import annotations

import logging
import os


def setup_logging(rank: int | None = None) -> None:
    """Configure the root logger for this process (``rank``: default ``$RANK`` or 0)."""
    rank = int(os.environ.get("RANK", "0")) if rank is None else rank
    # Under torchrun a line names its rank; one process alone gets a time stamp instead.
    fmt = (f"[rank{rank}] %(levelname)s %(name)s: %(message)s" if "RANK" in os.environ
           else "%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, format=fmt,
                        force=True)
