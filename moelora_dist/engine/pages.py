"""The page allocator: which KV pages are free and which sequence holds which.

Host bookkeeping only (the pages themselves are :class:`~moelora_dist.models.batch.PagedKVCache`
on the device). A sequence's block table is the list of its pages in token order; it grows a
page at a time as the sequence grows and is returned whole when the sequence finishes, is
aborted or is preempted. The most recently freed page is handed out first (it is the likeliest
to be warm in the device's cache).

Invariants (checked by :meth:`PageAllocator.check`, which the tests call every step): every
page is either free or held by exactly one sequence, and no page is free twice.
"""

from __future__ import annotations


class PageAllocator:
    """``num_pages`` pages of ``page_size`` tokens, handed to sequences by id."""

    def __init__(self, num_pages: int, page_size: int):
        if num_pages < 1 or page_size < 1:
            raise ValueError(f"need at least one page of at least one token; got {num_pages} "
                             f"pages of {page_size}")
        self.num_pages, self.page_size = num_pages, page_size
        self._free: list[int] = list(range(num_pages - 1, -1, -1))  # pop() hands out page 0 first
        self._tables: dict[str, list[int]] = {}

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_pages - len(self._free)

    def pages_for(self, num_tokens: int) -> int:
        """Pages that hold ``num_tokens`` tokens."""
        return -(-num_tokens // self.page_size)

    def table(self, seq_id: str) -> list[int]:
        """The pages of ``seq_id`` in token order (empty when it holds none)."""
        return self._tables.get(seq_id, [])

    def needed(self, seq_id: str, num_tokens: int) -> int:
        """Pages ``seq_id`` still needs to hold ``num_tokens`` tokens."""
        return max(0, self.pages_for(num_tokens) - len(self.table(seq_id)))

    def can_grow(self, seq_id: str, num_tokens: int) -> bool:
        return self.needed(seq_id, num_tokens) <= len(self._free)

    def grow(self, seq_id: str, num_tokens: int) -> list[int]:
        """Give ``seq_id`` the pages it lacks for ``num_tokens`` tokens; returns its table.
        The caller checks :meth:`can_grow` first (running out here is a scheduler bug)."""
        n = self.needed(seq_id, num_tokens)
        assert n <= len(self._free), f"{seq_id}: {n} pages needed, {len(self._free)} free"
        table = self._tables.setdefault(seq_id, [])
        for _ in range(n):
            table.append(self._free.pop())
        return table

    def free(self, seq_id: str) -> int:
        """Return every page of ``seq_id`` (none is fine); returns how many."""
        table = self._tables.pop(seq_id, [])
        self._free.extend(reversed(table))
        return len(table)

    def check(self) -> None:
        """Assert the invariants of the module docstring (tests; O(pages))."""
        held = [p for t in self._tables.values() for p in t]
        assert len(set(held)) == len(held), "a page is held by two sequences"
        assert len(set(self._free)) == len(self._free), "a page is free twice"
        assert not set(held) & set(self._free), "a held page is also free"
        assert len(held) + len(self._free) == self.num_pages, "a page leaked"
