"""Decode throughput of the whole model runner, with and without 8 LoRA adapters in the batch.

    python -m benchmarks decode                     # Qwen3-30B-A3B shape, 4 layers
    python -m benchmarks decode --model gpt-oss-20b # gpt-oss-20b shape, 24 layers
    python -m benchmarks decode --tiny --device cpu # a seconds-long smoke run
    torchrun --standalone --nproc-per-node 2 -m benchmarks.e2e.bench_decode --tp 2 --ep 2

Model: random weights of Qwen3-30B-A3B's shape (H 2048, 32 q / 4 kv heads of 128, E 128, top-8
renormalized, I 768, vocab 151936) with ``--layers`` decoder layers (default 4, to fit one GPU),
bf16. Adapters: 8 of rank 16 on q/k/v/o and on every expert's gate/up/down, all resident in a
pool of 8 slots. For each batch size B: B requests with ``--prompt-len`` random tokens are
prefilled (untimed), then ``--steps`` greedy decode steps are timed end to end on the host
clock (batch layout, batch info, forward, LM head, argmax and its copy to the host: what a
serving loop pays per step). "base" runs the batch with no adapter; "lora8" gives request b
adapter ``b % 8``. Headline: tokens/s of lora8 over base (target >= 0.85 at B = 64).

``--model gpt-oss-20b``: gpt-oss-20b's shape (H 2880, 64 q / 8 kv heads of 64, E 32 top-4,
I 2880, vocab 201088, attention sinks, a 128-token window on the even layers, YaRN, biased
experts with the clamped SwiGLU), all 24 layers by default; adapters on q/k/v/o and every
expert. It runs on today's contiguous KV cache (the engine's paged path is not in main yet).

Two decode paths, column ``decode``: "graph" replays the step from CUDA graphs
(``moelora_dist.models.graphs``: batch padded to a bucket, KV read over the cache capacity;
captured on the first step of each case, during warm-up) and "eager" runs it op by op. On
CUDA both run (``--graphs auto``, the default; ``off``: eager only); on a CPU only eager, or
``--graphs static`` runs the same padded static step uncaptured (smoke test of that path).

Before timing, a correctness check runs one LoRA decode step: requests 0 and 1 of the mixed
batch against the same requests run alone, on CUDA the Triton MoE path against the PyTorch
reference (the model's backend switched to ``torch``), and the graph (or static) step against the eager one;
max abs error over max |logit| must stay below 5e-2 (bf16). A failing check is written to the
CSV with ``ok=False``, and the run exits 1.
Results: ``e2e_decode_<device>.csv`` and ``.png`` in ``--out-dir`` (the CSV's first columns:
device, versions, git commit, UTC time).
"""

from __future__ import annotations

import argparse
import logging
import os
import time

import torch
from tqdm import tqdm

from moelora_dist.adapters.canonical import CanonicalAdapter, LoRAFactors, MoELayerLoRA
from moelora_dist.lora.batch_info import build_batch_info
from moelora_dist.models.batch import ForwardBatch
from moelora_dist.config.model import ModelConfig
from moelora_dist.models.graphs import DecodeGraphs, bucket_for
from moelora_dist.models.model import MoELoRAModel
from moelora_dist.models.weights import RandomWeights
from benchmarks.common import env_columns
from benchmarks.e2e.decode_report import write_outputs

log = logging.getLogger("bench_decode")
CHECK_TOL = 5e-2
QWEN3_30B_A3B = dict(model_type="qwen3_moe", vocab_size=151936, hidden_size=2048,
                     num_attention_heads=32, num_key_value_heads=4, head_dim=128,
                     num_experts=128, num_experts_per_tok=8, moe_intermediate_size=768,
                     intermediate_size=6144, norm_topk_prob=True, rms_norm_eps=1e-6,
                     rope_parameters={"rope_type": "default", "rope_theta": 1e6},
                     max_position_embeddings=40960)
GPT_OSS_20B = dict(model_type="gpt_oss", vocab_size=201088, hidden_size=2880,
                   num_attention_heads=64, num_key_value_heads=8, head_dim=64,
                   num_local_experts=32, num_experts_per_tok=4, intermediate_size=2880,
                   sliding_window=128, rms_norm_eps=1e-5, max_position_embeddings=131072,
                   attention_bias=True, swiglu_limit=7.0)
MODEL_SHAPES = {"qwen3-30b-a3b": (QWEN3_30B_A3B, 4), "gpt-oss-20b": (GPT_OSS_20B, 24)}
TINY = dict(QWEN3_30B_A3B, vocab_size=256, hidden_size=64, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, num_experts=8, num_experts_per_tok=2,
            moe_intermediate_size=32, intermediate_size=96)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="tiny shapes (CPU smoke test)")
    p.add_argument("--model", choices=tuple(MODEL_SHAPES), default="qwen3-30b-a3b",
                   help="the shape (random weights; default qwen3-30b-a3b)")
    p.add_argument("--layers", type=int, default=None,
                   help="decoder layers (default 4 for qwen3-30b-a3b, 24 for gpt-oss-20b; "
                        "tiny 2)")
    p.add_argument("--batches", default=None, help="comma-separated batch sizes "
                   "(default 1,16,64,256; tiny 1,4)")
    p.add_argument("--steps", type=int, default=32, help="timed decode steps per case")
    p.add_argument("--warmup", type=int, default=4, help="untimed decode steps first")
    p.add_argument("--prompt-len", type=int, default=128, help="prompt tokens per request")
    p.add_argument("--num-adapters", type=int, default=8)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    p.add_argument("--device", choices=("cuda", "cpu"), default=None)
    p.add_argument("--graphs", choices=("auto", "off", "static"), default="auto",
                   help="auto: graph and eager rows on CUDA (one process), eager elsewhere; "
                        "off: eager only; static: the padded static step uncaptured")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--ep", type=int, default=1)
    p.add_argument("--out-dir", default=os.path.join(os.path.dirname(__file__), "..", "results",
                                                     "current"))
    return p.parse_args(argv)


def make_groups(args):
    from moelora_dist.parallel.groups import ParallelGroups, init_parallel

    if "RANK" in os.environ:
        return init_parallel(args.tp, args.ep)
    dev = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    return ParallelGroups.single(torch.device("cuda", 0) if dev == "cuda" else "cpu")


def random_adapter(name, cfg, rank, device, seed) -> CanonicalAdapter:
    """Rank-``rank`` LoRA on q/k/v/o and on every expert projection of every layer (fp32)."""
    g = torch.Generator(device=device).manual_seed(seed)
    rn = lambda *s: torch.randn(*s, generator=g, device=device) * 0.02  # noqa: E731
    E, H, I, D = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate, cfg.head_dim
    f = lambda o, i, e=1: LoRAFactors(rn(e, rank, i), rn(e, o, rank), 2.0)  # noqa: E731
    dense, moe = {}, {}
    for layer in range(cfg.num_layers):
        p = f"layers.{layer}.self_attn"
        dense[f"{p}.q_proj"] = f(cfg.num_heads * D, H)
        dense[f"{p}.k_proj"] = f(cfg.num_kv_heads * D, H)
        dense[f"{p}.v_proj"] = f(cfg.num_kv_heads * D, H)
        dense[f"{p}.o_proj"] = f(H, cfg.num_heads * D)
        moe[layer] = MoELayerLoRA(E, f(I, H, E), f(I, H, E), f(H, I, E))
    return CanonicalAdapter(name, moe=moe, dense=dense, format="random")


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Case:
    """B requests prefilled into a KV cache; ``step()`` decodes one token for all.

    With ``graphs`` the steps go through :class:`DecodeGraphs` and the cache is the one it
    owns, so only the latest graph case may step.
    """

    def __init__(self, model: MoELoRAModel, prompts_BP: torch.Tensor, max_new: int,
                 req_to_slot_B: torch.Tensor, graphs: DecodeGraphs | None = None):
        B, prompt_len = prompts_BP.shape
        self.model, self.B, self.slots, self.graphs = model, B, req_to_slot_B, graphs
        dev = model.device
        self.cache = (graphs.cache_for(B, prompt_len + max_new + 1) if graphs else
                      model.new_cache(B, prompt_len + max_new + 1))
        self.lens = [prompt_len] * B
        # Prefill (untimed) in chunks of <= 2048 tokens: bounded activation memory. (Kernels
        # at e303396 also failed to launch a LoRA call with 128x128 tiles, 256 KiB of shared
        # memory; fixed since, and tests/gpu runs that case at T = 700.)
        chunk = max(1, 2048 // prompt_len)
        last = []
        for b0 in range(0, B, chunk):
            rows = list(range(b0, min(B, b0 + chunk)))
            batch = ForwardBatch.build([prompt_len] * len(rows), [0] * len(rows), dev,
                                       cache_rows=rows)
            last.append(self._run(prompts_BP[rows].flatten().to(dev), batch, self.slots[rows]))
        self.next_ids = torch.argmax(torch.cat(last), dim=-1)
        self.ids_host, self.slots_host = self.next_ids.tolist(), req_to_slot_B.tolist()

    def _run(self, ids_T, batch, slots_B):
        info = build_batch_info(batch.seg_indptr_B1, slots_B, self.model.pool.slot_rank_S)
        hidden = self.model.forward(ids_T, batch, self.cache, info)
        return self.model.logits(hidden[batch.last_token_index_B])

    def step(self) -> torch.Tensor:
        """``[B, V]`` fp32 logits of this step (a graph's static buffer: clone to keep)."""
        if self.graphs is not None:
            logits, next_ids = self.graphs.step(self.ids_host, self.lens, self.slots_host)
        else:
            batch = ForwardBatch.build([1] * self.B, self.lens, self.model.device)
            logits = self._run(torch.tensor(self.ids_host, device=self.model.device), batch,
                               self.slots)
            next_ids = torch.argmax(logits, dim=-1)
        self.ids_host = next_ids.tolist()  # the host needs the tokens (stop checks, output)
        self.lens = [n + 1 for n in self.lens]
        return logits


def prompts(cfg, B: int, prompt_len: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, cfg.vocab_size, (B, prompt_len), generator=g)


def check(model, args, lora_slots, graphs: DecodeGraphs | None) -> float:
    """Relative max error of one mixed-batch LoRA decode step (eager) against (a) requests 0
    and 1 run alone (slot mapping, batching), (b) on CUDA, the PyTorch reference MoE path and
    (c) with ``graphs``, the graph (or static) step, on a base and on the mixed batch."""
    B = 3  # not a bucket: the graph step pads it to 4
    p = prompts(model.cfg, B, args.prompt_len, seed=1)
    slots = lora_slots(B)
    mixed = Case(model, p, 2, slots).step().float()
    rel = lambda got, want: ((got.float() - want).abs().max() / want.abs().max()).item()
    errs = [rel(Case(model, p[b:b + 1], 2, slots[b:b + 1]).step()[0], mixed[b]) for b in (0, 1)]
    if graphs is not None:
        base_slots = torch.full_like(slots, -1)
        base = Case(model, p, 2, base_slots).step().float()
        for want, s in ((mixed, slots), (base, base_slots)):
            errs.append(rel(Case(model, p, 2, s, graphs).step().clone(), want))
    if model.device.type == "cuda":
        with model.backend_as("torch"):
            errs.append(rel(mixed, Case(model, p, 2, slots).step().float()))
    return max(errs) if torch.isfinite(mixed).all() else float("inf")


def run(args) -> list[dict]:
    groups = make_groups(args)
    rank0 = groups.is_rank0
    shape, layers = MODEL_SHAPES[args.model]
    raw = dict(TINY if args.tiny else shape)
    raw["num_hidden_layers"] = args.layers or (2 if args.tiny else layers)
    cfg = ModelConfig.from_dict(raw)
    dtype = getattr(torch, args.dtype)
    dev = groups.device
    model = MoELoRAModel.build(cfg, groups, RandomWeights(cfg, dtype, dev, seed=0), dtype=dtype,
                               max_loras=args.num_adapters, max_rank=args.rank, progress=rank0)
    for i in tqdm(range(args.num_adapters), desc="adapters", disable=not rank0):
        model.pool.load(random_adapter(f"a{i}", cfg, args.rank, dev, seed=100 + i))
    slot_of = [model.pool.slot_of(f"a{i}") for i in range(args.num_adapters)]
    lora_slots = lambda B: torch.tensor([slot_of[b % len(slot_of)] for b in range(B)],
                                        dtype=torch.int32, device=dev)
    graphs, decodes = None, ["eager"]
    if args.graphs == "static" or (args.graphs == "auto" and dev.type == "cuda"
                                   and groups.layout.world_size == 1):
        graphs = DecodeGraphs(model, capture=args.graphs == "auto")
        decodes = ["graph" if graphs.capture else "static", "eager"]
    err = check(model, args, lora_slots, graphs)
    ok = err < CHECK_TOL
    if rank0:
        log.info("correctness check: relative max error %.3g (%s)", err, "ok" if ok else "FAIL")
    batches = [int(b) for b in (args.batches or ("1,4" if args.tiny else "1,16,64,256")).split(",")]
    rows = []
    cases = [(b, d) for b in batches for d in decodes if d == "eager" or bucket_for(b)]
    for B, decode in tqdm(cases, desc="cases", disable=not rank0):
        for mode in ("base", "lora8"):
            slots = lora_slots(B) if mode == "lora8" else torch.full((B,), -1, dtype=torch.int32,
                                                                     device=dev)
            use = graphs if decode != "eager" else None
            case = Case(model, prompts(cfg, B, args.prompt_len), args.warmup + args.steps, slots,
                        use)
            for _ in range(args.warmup):
                case.step()
            sync(dev)
            t0 = time.perf_counter()
            for _ in range(args.steps):
                case.step()
            sync(dev)
            sec = time.perf_counter() - t0
            rows.append(dict(batch=B, mode=mode, decode=decode,
                             tokens_per_s=round(B * args.steps / sec, 2),
                             ms_per_step=round(1e3 * sec / args.steps, 3), check_rel_err=err,
                             ok=ok))
            del case
        base, lora = rows[-2], rows[-1]
        lora["ratio_vs_base"] = round(lora["tokens_per_s"] / base["tokens_per_s"], 4)
        base["ratio_vs_base"] = 1.0
    return rows, cfg, groups


def meta(args, cfg, groups) -> dict:
    return dict(**env_columns(), world=groups.layout.world_size, tp=groups.tp_size,
                ep=groups.ep_size, model="tiny" if args.tiny else f"{args.model}-shape",
                layers=cfg.num_layers,
                dtype=args.dtype, prompt_len=args.prompt_len, steps=args.steps,
                adapters=args.num_adapters, rank=args.rank)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    rows, cfg, groups = run(args)
    if groups.is_rank0:
        m = meta(args, cfg, groups)
        path = write_outputs(rows, m, args.out_dir)
        for r in rows:
            log.info("B=%-4d %-6s %-6s %10.1f tok/s %8.2f ms/step ratio %.3f", r["batch"],
                     r["decode"], r["mode"], r["tokens_per_s"], r["ms_per_step"],
                     r["ratio_vs_base"])
        for r in rows:
            if r["batch"] == 64 and r["mode"] == "lora8":
                log.info("headline B=64 %s: lora8 / base = %.3f (target >= 0.85)", r["decode"],
                         r["ratio_vs_base"])
        log.info("wrote %s.csv", path)
    if groups.backend != "none":
        from moelora_dist.parallel.groups import destroy_parallel
        destroy_parallel()
    return 0 if rows and rows[0]["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
