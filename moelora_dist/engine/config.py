"""The engine's settings, checked once before anything is built.

    cfg = EngineConfig(max_num_seqs=64, max_num_batched_tokens=4096, num_pages=512)

Every field has the CLI flag of the same name with dashes (``--max-num-seqs``). The page pool
is sized from the device memory left after the weights, the LoRA pool and one profiled
forward (``gpu_memory_utilization`` of the device, :mod:`.memory`) unless ``num_pages`` says
how many; on a CPU the default is :data:`CPU_DEFAULT_TOKENS` tokens of pages.
"""

from __future__ import annotations

from dataclasses import dataclass

from moelora_dist.errors import OptionError

CPU_DEFAULT_TOKENS = 1 << 16
GRAPH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)


@dataclass
class EngineConfig:
    """What the scheduler, the page pool, the adapter slots and the graphs may use.

    max_num_seqs: sequences running at once (the decode batch cap).
    max_num_batched_tokens: new tokens in one forward (decodes + prefill chunks); prompts
        longer than what is left are prefilled in chunks over several steps.
    page_size: tokens per KV page.
    num_pages: pages in the pool; None sizes it from memory (``gpu_memory_utilization``).
    gpu_memory_utilization: share of the device's memory the process may fill in all.
    max_model_len: longest sequence (prompt + output) accepted; None: the model's
        ``max_position_embeddings`` (else 8192).
    max_loras: adapter slots on the device (distinct adapters in one step).
    max_rank: largest LoRA rank the slots hold.
    enforce_eager: never replay CUDA graphs.
    max_graph_tokens: largest step (tokens) replayed from a CUDA graph; larger steps run
        eagerly. Graph sizes are the buckets of :data:`GRAPH_BUCKETS` up to it; a graph of P
        tokens holds :meth:`graph_seqs` ``(P)`` sequences.
    dispatcher: MoE dispatcher (``auto`` picks per step size).
    async_steps: plan and queue step N+1 (and broadcast its plan to the TP followers) while
        the device runs step N, before reading step N's tokens (``Engine.step``; :mod:`.step`).
        False: each step is read back before the next is scheduled.
    """

    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    page_size: int = 16
    num_pages: int | None = None
    gpu_memory_utilization: float = 0.9
    max_model_len: int | None = None
    max_loras: int = 8
    max_rank: int = 64
    enforce_eager: bool = False
    max_graph_tokens: int = 2048
    dispatcher: str = "auto"
    async_steps: bool = True

    def validate(self) -> None:
        """``OptionError`` naming the first field whose value cannot work."""
        for name in ("max_num_seqs", "max_num_batched_tokens", "page_size", "max_loras",
                     "max_rank"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise OptionError(f"--{name.replace('_', '-')} {value!r}: must be an integer "
                                  ">= 1")
        for name in ("num_pages", "max_model_len"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise OptionError(f"--{name.replace('_', '-')} {value!r}: must be an integer "
                                  ">= 1")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise OptionError(f"--gpu-memory-utilization {self.gpu_memory_utilization}: must "
                              "lie in (0, 1]")
        if self.max_graph_tokens < 0:
            raise OptionError(f"--max-graph-tokens {self.max_graph_tokens}: must be >= 0")

    @property
    def graph_buckets(self) -> tuple[int, ...]:
        """Step sizes (tokens, and the sequence cap of the step) that graphs are keyed by."""
        if self.enforce_eager:
            return ()
        return tuple(b for b in GRAPH_BUCKETS if b <= self.max_graph_tokens)

    def graph_seqs(self, P: int) -> int:
        """Sequences in a graph of ``P`` tokens: ``P`` up to the bucket that holds
        ``max_num_seqs`` (every decode step, padded, stays one token per sequence), and
        ``max_num_seqs + 1`` in the larger graphs of prompt chunks (one more than can run, so
        a padding sequence is left for the padding tokens): a 2048-token chunk's graph
        samples a few rows, not 2048."""
        top = next((b for b in GRAPH_BUCKETS if b >= self.max_num_seqs), GRAPH_BUCKETS[-1])
        return P if P <= top else min(P, self.max_num_seqs + 1)

    def pages_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.page_size)
