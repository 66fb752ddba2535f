"""The tensors the MoE LoRA kernels read, as one small tuple (kernels take tensors, not the
pool's objects).

Legend: S slots, R max rank, E_l local experts, H hidden, I_l local intermediate.

    gate_up_a: [S, Ea, 2R, H]      rows [0, R) are A_gate, rows [R, 2R) are A_up
    gate_up_b: [S, E_l, 2*I_l, R]  rows [0, I_l) are B_gate, [I_l, 2*I_l) are B_up; the
                                   gate rows read shrink columns [0, R), the up rows [R, 2R)
    down_a:    [S, E_l, R, I_l]
    down_b:    [S, Eb, H, R]
    gate_up_a_shared, down_b_shared: [S] bool; slot_rank: [S] int32

``Ea`` / ``Eb`` is ``E_l``, or 1 for buffers built for shared-outer adapters only. The LoRA
scaling is folded into ``B``. A slot whose ``gate_up_a_shared`` (``down_b_shared``) flag is set
keeps one copy of A_gate/A_up (B_down) at expert index 0, read with an expert stride of 0.
``slot_rank[s]`` is the largest rank slot ``s`` uses in this layer (0: empty); rows past it
are zero and never read.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class MoELoRAWeights(NamedTuple):
    gate_up_a: torch.Tensor  # [S, Ea, 2R, H]
    gate_up_b: torch.Tensor  # [S, E_l, 2*I_l, R]
    down_a: torch.Tensor  # [S, E_l, R, I_l]
    down_b: torch.Tensor  # [S, Eb, H, R]
    gate_up_a_shared: torch.Tensor  # [S] bool
    down_b_shared: torch.Tensor  # [S] bool
    slot_rank: torch.Tensor  # [S] int32

    @property
    def num_slots(self) -> int:
        return int(self.gate_up_a.shape[0])

    @property
    def max_rank(self) -> int:
        """Ranks the kernels read (the pool's max rank, or less in a :meth:`rank_view`)."""
        return int(self.down_a.shape[2])

    @property
    def a_half_rows(self) -> int:
        """Row of ``gate_up_a`` where A_up starts: the pool's max rank, also in a view."""
        return int(self.gate_up_a.shape[2]) // 2

    @property
    def num_local_experts(self) -> int:
        return int(self.gate_up_b.shape[1])

    @property
    def i_local(self) -> int:
        return int(self.down_a.shape[3])

    @property
    def hidden(self) -> int:
        return int(self.gate_up_a.shape[3])

    @classmethod
    def zeros(cls, num_slots: int, num_local_experts: int, max_rank: int, hidden: int,
              i_local: int, *, dtype: torch.dtype, device: torch.device | str = "cpu",
              outer_shared_only: bool = False) -> "MoELoRAWeights":
        """Empty buffers: every slot of rank 0 (``outer_shared_only``: expert dims of 1)."""
        e_outer = 1 if outer_shared_only else num_local_experts
        S, E, R, H, I = num_slots, num_local_experts, max_rank, hidden, i_local
        kw = dict(dtype=dtype, device=device)
        return cls(
            gate_up_a=torch.zeros(S, e_outer, 2 * R, H, **kw),
            gate_up_b=torch.zeros(S, E, 2 * I, R, **kw),
            down_a=torch.zeros(S, E, R, I, **kw),
            down_b=torch.zeros(S, e_outer, H, R, **kw),
            gate_up_a_shared=torch.full((S,), outer_shared_only, dtype=torch.bool, device=device),
            down_b_shared=torch.full((S,), outer_shared_only, dtype=torch.bool, device=device),
            slot_rank=torch.zeros(S, dtype=torch.int32, device=device),
        )

    def rank_view(self, max_rank: int) -> "MoELoRAWeights":
        """The same buffers seen with ranks ``< max_rank`` only (views, no copy): the kernels
        size their rank tiles from :attr:`max_rank`, so a batch whose adapters have rank 16 in
        a pool of rank 64 runs 16-wide tiles. Every slot the batch enables must have a rank
        ``<= max_rank`` (the caller's promise; ``BatchInfo.max_rank`` is computed so)."""
        r = int(max_rank)
        if r >= self.max_rank:
            return self
        if r < 1:
            raise ValueError(f"max_rank must be >= 1, got {r}")
        return self._replace(gate_up_b=self.gate_up_b[..., :r], down_a=self.down_a[:, :, :r],
                             down_b=self.down_b[..., :r])

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self)
