"""One tuning run: the phases, the time budget, the progress bar.

    base phase   every (shape, T): the heuristic's config as a whole layer (the default every
                 gain is measured against); for each block_m near the rows per expert, the
                 gate_up tiles and then the down tiles, each timed as its own kernel; the two
                 winners of each block_m as a whole layer; the fastest whole layer, then it
                 with each program order (``group_m`` of ``space.GROUP_MS``), wins
    LoRA round 1 every (shape, T, rank): ``space.lora_candidates`` around the base winner of
                 that T, whole-layer timings
    LoRA round 2 ``space.merged``: the best value of every switch at once, where that
                 config is new (one more whole-layer timing)
    refine       (``refine=``, instead of the phases above) every problem's stored entry
                 timed in this run, then with each program order of ``space.GROUP_MS``: the
                 fastest is kept, the stored config included, so the comparison is inside
                 one run (entries kept from older runs by ``--keep-faster`` on a time of
                 another run may predate ``group_m``)
    stored       (``stored=``, ``--keep-faster``) the entry ``--out`` has for a problem is one
                 more candidate: timed in this run after the base winners (then swept over
                 the orders with the winner) and second in LoRA round 1

Budget: the base phase ends at 45% of the budget when LoRA is tuned too (else at the end), LoRA
round 1 at 90%; inside a phase every problem gets an equal share of what is left (unused time
passes on). Candidates of a problem run in priority order (the heuristic first), so a problem
cut short still has its default and best guesses measured. All candidates of a phase are handed
to the compile pool when the phase starts, so compiling runs ahead of timing.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass

import torch
from tqdm import tqdm

from moelora_dist.errors import one_line
from moelora_dist.kernels.moe_lora.configs import MoEConfig, heuristic_config
from moelora_dist.tuning import space
from moelora_dist.tuning.compile_pool import PENDING, CompilePool
from moelora_dist.tuning.measure import BaseStages, check, run_layer
from moelora_dist.tuning.problems import (NUM_SLOTS, Problem, make_inputs, reference_rows,
                                          rows_per_expert)

log = logging.getLogger(__name__)
BASE_SHARE, LORA1_SHARE = 0.45, 0.90
# How long a problem's default (the heuristic) may wait for its compile beyond the problem's
# share: on the H200 (2026-12-04) the first base problem's share (2.7 s of a 170 s run) ended
# before the workers had compiled its default, and the run wrote no entry for it.
DEFAULT_WAIT_S = 30.0


@dataclass
class Outcome:
    problem: Problem
    config: MoEConfig
    ms: float  # whole layer, graph replay
    default_ms: float  # the heuristic's config, the same way
    tried: int  # candidates timed
    failed: int  # candidates skipped for a failure (each in the skipped list)
    stored_timed: bool = False  # the entry --out had for it was timed in this run too


@dataclass
class Skip:
    problem: Problem
    config: MoEConfig
    reason: str


def _heuristic(p: Problem, E_l: int) -> MoEConfig:
    """What pick_config answers for this problem when no tuned file matches (for FP8 experts
    with the block_k the kernels then run: ``space.for_fp8``)."""
    cfg = heuristic_config(p.tokens, p.shape.top_k, E_l, 1 if p.rank is None else NUM_SLOTS)
    return space.for_fp8(cfg) if p.fp8 else cfg


def _down_key(cfg: MoEConfig, first: MoEConfig) -> MoEConfig:
    """The candidate the pool compiled for ``cfg``'s down tiles (on the block_m's first
    gate_up tiles: down's kernel does not depend on them)."""
    return dataclasses.replace(first, **{f: getattr(cfg, f) for f in (
        "down_block_n", "down_block_k", "down_num_warps", "down_num_stages")})


class Tuner:
    def __init__(self, base: list[Problem], lora: list[Problem], *, device: str, timer,
                 pool: CompilePool, budget_s: float, clock=time.monotonic, progress=True,
                 refine: dict[Problem, tuple[MoEConfig, float]] | None = None,
                 stored: dict[Problem, MoEConfig] | None = None):
        self.base, self.lora = base, lora
        # problem -> (stored config, stored default_ms): the refine phase only
        self.refine = refine
        # problem -> the config --out already has: one more candidate of the search
        # (``--keep-faster``), so the entry written is the fastest of this run's timings
        self.stored = stored or {}
        self.device, self.timer, self.pool, self.clock = device, timer, pool, clock
        self.start = clock()
        self.budget_s = budget_s
        self.outcomes: dict[Problem, Outcome] = {}
        self.skipped: list[Skip] = []
        self._round1: dict[Problem, tuple[MoEConfig, list]] = {}
        self.timed = 0
        self.last_y = None
        self._bar = tqdm(total=len(refine) if refine is not None else len(base) + len(lora),
                         desc="tune-kernels", unit="problem", disable=not progress)

    def left(self) -> float:
        return self.start + self.budget_s - self.clock()

    def _phase_end(self, share: float) -> float:
        return self.start + self.budget_s * share

    def run(self) -> tuple[list[Outcome], list[Skip]]:
        try:
            if self.refine is not None:
                self._refine_phase(self._phase_end(1.0))
                return list(self.outcomes.values()), self.skipped
            self._base_phase(self._phase_end(BASE_SHARE if self.lora else 1.0))
            if self.lora:
                self._lora_round1(self._phase_end(LORA1_SHARE))
                self._lora_round2(self._phase_end(1.0))
        finally:
            self._bar.close()
        return list(self.outcomes.values()), self.skipped

    # -- one candidate ------------------------------------------------------------------------

    def _evaluate(self, p, inp, ref, default_y, cfg, time_fn, est, until, *,
                  pool_key: MoEConfig | None | bool = True):
        """Whole-layer check of ``cfg``, then the time of ``time_fn(cfg)``; None if skipped.

        ``pool_key``: the candidate whose compile to wait for (True: ``cfg`` itself; False:
        none, its kernels were compiled for other candidates). The output of the checked run
        is kept in ``self.last_y``."""
        self.last_y = None
        reason = None
        if pool_key is not False:
            reason = self.pool.result(p, cfg if pool_key is True else pool_key,
                                      timeout=until - self.clock())
            if reason == PENDING:
                return None  # not a failure of the config: out of time for it
        if reason is None:
            try:
                y = run_layer(inp, cfg)
                reason = check(y, ref, default_y)
                self.last_y = y if reason is None else None
            except Exception as exc:  # e.g. out of shared memory at launch: record, go on
                reason = self._failure(exc)
        if reason is None:
            try:
                ms = self.timer(time_fn(cfg), est)
                self.timed += 1
                return ms
            except Exception as exc:
                reason = self._failure(exc)
        self.skipped.append(Skip(p, cfg, reason))
        return None

    @staticmethod
    def _failure(exc: Exception) -> str:
        msg = one_line(f"{type(exc).__name__}: {exc}")[:300]
        if "CUDA error" in msg:  # the context is broken: nothing after this can be trusted
            raise exc
        return msg

    def _layer(self, inp):
        return lambda cfg: (lambda: run_layer(inp, cfg))

    def _default(self, p, inp, ref, heur, until, end):
        """The heuristic's whole-layer time (inf if it fails) and its output (or None).

        Its compile may take longer than the problem's share (the first problems of a run
        wait while the workers compile every candidate of the phase): the default waits up to
        :data:`DEFAULT_WAIT_S` past ``until`` (never past the phase's ``end``), since without
        it the problem gets no entry at all."""
        ms = self._evaluate(p, inp, ref, None, heur, self._layer(inp), None,
                            self._patient(until, end))
        return (math.inf if ms is None else ms), self.last_y

    def _patient(self, until: float, end: float) -> float:
        """The deadline of a config a problem must not go without (its default, the entry
        ``--out`` has): up to :data:`DEFAULT_WAIT_S` past ``until``, never past ``end``."""
        return max(until, min(end, self.clock() + DEFAULT_WAIT_S))

    def _sweep_orders(self, p, inp, ref, ref_y, best: MoEConfig, best_ms: float,
                      until: float) -> tuple[MoEConfig, float]:
        """``best`` timed with each other ``group_m`` of ``space.GROUP_MS`` (a runtime
        argument: ``best``'s binary runs them all) until ``until``; the fastest of them."""
        start = best
        for g in space.GROUP_MS if best_ms < math.inf else ():
            if g == start.group_m:
                continue
            if self.clock() >= until:
                break
            alt = dataclasses.replace(start, group_m=g)
            ms = self._evaluate(p, inp, ref, ref_y, alt, self._layer(inp), best_ms, until,
                                pool_key=False)
            if ms is not None and ms < best_ms:
                best, best_ms = alt, ms
        return best, best_ms

    # -- base -----------------------------------------------------------------------------

    def _base_candidates(self, p, inp):
        heur = _heuristic(p, inp["w_gate_up_EXH"].shape[0])
        out = [heur]
        for bm in space.block_ms(rows_per_expert(inp), heur.block_m):
            gus = space.gate_up_tiles(heur, bm, p.fp8)
            out += gus + space.down_tiles(gus[0], p.fp8)
        return heur, out

    def _base_phase(self, end: float) -> None:
        plans = {}
        for p in self.base:
            inp = make_inputs(p, self.device)
            plans[p] = self._base_candidates(p, inp)
            for cfg in plans[p][1] + ([self.stored[p]] if p in self.stored else []):
                self.pool.submit(p, cfg)
            del inp
        for i, p in enumerate(self.base):
            until = self.clock() + max(0.0, end - self.clock()) / (len(self.base) - i)
            self._tune_base(p, plans[p][0], until, end)
            self._submit_lora_of(p)
            self._bar.update()

    def _tune_base(self, p: Problem, heur: MoEConfig, until: float, end: float) -> None:
        inp = make_inputs(p, self.device)
        ref = reference_rows(inp)
        timed0, failed0 = self.timed, len(self.skipped)
        default_ms, default_y = self._default(p, inp, ref, heur, until, end)
        best, best_ms = heur, default_ms
        layer = self._layer(inp)
        bms = space.block_ms(rows_per_expert(inp), heur.block_m)
        for j, bm in enumerate(bms):
            bm_until = self.clock() + max(0.0, until - self.clock()) / (len(bms) - j)
            half = self.clock() + max(0.0, bm_until - self.clock()) / 2
            stages = BaseStages(inp, bm)
            gus = space.gate_up_tiles(heur, bm, p.fp8)
            gu = self._best(p, inp, ref, default_y, gus, stages.gate_up, half)
            if gu is None:
                continue
            dns = space.down_tiles(gu, p.fp8)
            keys = [_down_key(c, gus[0]) for c in dns]
            combo = self._best(p, inp, ref, default_y, dns, lambda c: stages.down(c, gu),
                               bm_until, keys) or gu
            if combo == best:
                continue
            ms = self._evaluate(p, inp, ref, default_y, combo, layer, best_ms, until,
                                pool_key=False)
            if ms is not None and ms < best_ms:
                best, best_ms = combo, ms
        stored_timed = False
        if p in self.stored and self.stored[p] != best:  # the entry --out has, timed now
            ms = self._evaluate(p, inp, ref, default_y, self.stored[p], layer, best_ms,
                                self._patient(until, end))
            stored_timed = ms is not None
            if stored_timed and ms < best_ms:
                best, best_ms = self.stored[p], ms
        stored_timed = stored_timed or self.stored.get(p) == best
        best, best_ms = self._sweep_orders(p, inp, ref, default_y, best, best_ms, until)
        if p.fp8 and best.fp8_prequant:  # the winner's tiles with in-loop quantization
            alt = dataclasses.replace(best, fp8_prequant=False)
            ms = self._evaluate(p, inp, ref, default_y, alt, layer, best_ms, until,
                                pool_key=False)
            if ms is not None and ms < best_ms:
                best, best_ms = alt, ms
        self._finish(p, best, best_ms, default_ms, self.timed - timed0,
                     len(self.skipped) - failed0, stored_timed)

    def _best(self, p, inp, ref, default_y, cfgs, time_fn, until, keys=None):
        """The fastest of ``cfgs`` by ``time_fn`` (the first always tried), or None."""
        best, best_ms, est = None, math.inf, None
        for i, cfg in enumerate(cfgs):
            if i and self.clock() >= until:
                break
            ms = self._evaluate(p, inp, ref, default_y, cfg, time_fn, est, until,
                                pool_key=keys[i] if keys else True)
            if ms is not None:
                est = ms
                if ms < best_ms:
                    best, best_ms = cfg, ms
        return best

    def _finish(self, p, cfg, ms, default_ms, tried, failed, stored_timed=False) -> None:
        if ms == math.inf:
            log.warning("%s: no candidate passed the check; no entry written", p.name)
            return
        self.outcomes[p] = Outcome(p, cfg, ms, default_ms, tried, failed, stored_timed)
        self._bar.set_postfix_str(f"{p.name}: {ms:.4f} ms (default {default_ms:.4f}), "
                                  f"{self.left():.0f} s left")
        log.info("%-40s %.4f ms, default %.4f ms, %d timed, %d failed", p.name, ms,
                 default_ms, tried, failed)

    # -- refine -----------------------------------------------------------------------------

    def _refine_phase(self, end: float) -> None:
        for p, (cfg, _) in self.refine.items():
            self.pool.submit(p, cfg)
        for i, (p, (stored, stored_default_ms)) in enumerate(self.refine.items()):
            until = self.clock() + max(0.0, end - self.clock()) / (len(self.refine) - i)
            inp = make_inputs(p, self.device)
            ref = reference_rows(inp)
            timed0, failed0 = self.timed, len(self.skipped)
            # the stored config first (it waits for its compile as a default does)
            best_ms, ref_y = self._default(p, inp, ref, stored, until, end)
            best, best_ms = self._sweep_orders(p, inp, ref, ref_y, stored, best_ms, until)
            self._finish(p, best, best_ms, stored_default_ms, self.timed - timed0,
                         len(self.skipped) - failed0)
            self._bar.update()

    # -- LoRA -----------------------------------------------------------------------------

    def _lora_plan(self, p: Problem, inp):
        """(heuristic, start, round-one candidates) of a LoRA problem."""
        E_l = inp["w_gate_up_EXH"].shape[0]
        heur = _heuristic(p, E_l)
        base_p = Problem(p.shape, p.tokens, None, dtype=p.dtype, fp8=p.fp8)
        base = self.outcomes[base_p].config if base_p in self.outcomes else _heuristic(
            base_p, E_l)
        cands = space.lora_candidates(base, heur, rows_per_expert=rows_per_expert(inp),
                                      adapters=p.adapters, inter=p.shape.local_inter,
                                      fp8=p.fp8)
        if p in self.stored and self.stored[p] not in cands:  # the entry --out has
            cands = [*cands[:1], self.stored[p], *cands[1:]]
        return heur, space.with_lora_fields(base, heur), cands

    def _submit_lora_of(self, base_p: Problem) -> None:
        for p in self.lora:
            if (p.shape, p.tokens, p.dtype_key) == (base_p.shape, base_p.tokens,
                                                    base_p.dtype_key):
                for cfg in self._lora_plan(p, make_inputs(p, self.device))[2]:
                    self.pool.submit(p, cfg)

    def _lora_round1(self, end: float) -> None:
        for i, p in enumerate(self.lora):
            until = self.clock() + max(0.0, end - self.clock()) / (len(self.lora) - i)
            inp = make_inputs(p, self.device)
            ref = reference_rows(inp)
            heur, start, cands = self._lora_plan(p, inp)
            timed0, failed0 = self.timed, len(self.skipped)
            default_ms, default_y = self._default(p, inp, ref, heur, until, end)
            timed = [(heur, default_ms)] if default_ms < math.inf else []
            for cfg in cands:
                if cfg == heur:
                    continue
                if self.clock() >= until:
                    break
                ms = self._evaluate(p, inp, ref, default_y, cfg, self._layer(inp),
                                    default_ms if default_ms < math.inf else None, until)
                if ms is not None:
                    timed.append((cfg, ms))
            if timed:
                best, best_ms = min(timed, key=lambda t: t[1])
                self._finish(p, best, best_ms, default_ms, self.timed - timed0,
                             len(self.skipped) - failed0,
                             any(c == self.stored.get(p) for c, _ in timed))
                self._round1[p] = (start, timed)
            self._bar.update()

    def _lora_round2(self, end: float) -> None:
        todo = {}
        for p, (start, timed) in self._round1.items():
            cfg = space.merged(start, timed)
            if cfg is not None and all(cfg != c for c, _ in timed):
                todo[p] = cfg
                self.pool.submit(p, cfg)
        for i, (p, cfg) in enumerate(todo.items()):
            if self.clock() >= end:
                break
            until = self.clock() + max(0.0, end - self.clock()) / (len(todo) - i)
            inp = make_inputs(p, self.device)
            out = self.outcomes[p]
            ms = self._evaluate(p, inp, reference_rows(inp), None, cfg, self._layer(inp),
                                out.ms, until)
            if ms is not None:
                out.tried += 1
                if ms < out.ms:
                    out.config, out.ms = cfg, ms
                    log.info("%-40s round 2: %.4f ms", p.name, ms)
        if self.device == "cuda":
            torch.cuda.empty_cache()
