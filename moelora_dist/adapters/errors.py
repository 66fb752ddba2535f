"""The error of adapter loading: a user mistake in a checkpoint, never a bug here."""

from __future__ import annotations

from moelora_dist.errors import MoeloraError


class AdapterError(MoeloraError):
    """A checkpoint that cannot be loaded as given; the message names file, layer, key and fix."""
