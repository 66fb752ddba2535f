"""The one error type of adapter loading: a user mistake in a checkpoint, never a bug here."""

from __future__ import annotations


class AdapterError(ValueError):
    """A checkpoint that cannot be loaded as given; the message names file, layer, key and fix."""
