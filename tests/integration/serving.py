"""Helpers of the server tests: a tiny model with a tokenizer and two adapters on disk, the
offline engine's results to compare with, and a server subprocess that always stops.

    case = build_serve_case(tmp)                      # model dir (+ tokenizer), a1, a2
    with Server(case.args(), api_key="k") as srv:     # waits for /health; kills on exit
        client = srv.client()                         # the official openai client

The tokenizer is a BPE trained here (no download) on a small English corpus, sized to the
tiny model's 128-token vocabulary, with ``</s>`` as id 1 (the model's EOS) and a chat
template; so text prompts, chat messages and text outputs run through the real code paths.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tests.integration.launching import ROOT, free_port, job_env

SPECIAL = ["<s>", "</s>", "<|im_start|>", "<|im_end|>", "<unk>"]
CORPUS = ["the quick brown fox jumps over the lazy dog", "hello world how are you today",
          "a small model serves many adapters at once", "tell me a story about a cat",
          "what is two plus two", "write a short poem about the sea"] * 4
TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
            "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
STARTUP_S = 180


def write_tokenizer(model_dir: Path, vocab_size: int = 128) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL,
                                  show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    assert tok.get_vocab_size() <= vocab_size and tok.token_to_id("</s>") == 1
    tok.save(str(model_dir / "tokenizer.json"))
    (model_dir / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "</s>", "bos_token": "<s>",
        "unk_token": "<unk>", "chat_template": TEMPLATE}))


def build_serve_case(root: Path):
    """The e2e case (tiny Qwen3-MoE, adapters a1/a2) plus a tokenizer and an adapter root:
    ``root/loadable/a3`` (a copy of a1), ``root/loadable/broken`` (a malformed adapter),
    ``root/loadable/escape`` (a symlink to a directory outside the root); 1024 positions."""
    from tests.e2e_cases import build_case

    case = build_case("qwen3_moe", root / "case")
    write_tokenizer(case.model_dir)
    # Longer rotary tables than the HF model's 128 positions (it computes rotary on the fly,
    # so the references agree), so that a request can run long enough to be cancelled.
    config = json.loads((case.model_dir / "config.json").read_text())
    config["max_position_embeddings"] = 1024
    (case.model_dir / "config.json").write_text(json.dumps(config))
    loadable = root / "loadable"
    loadable.mkdir()
    shutil.copytree(case.adapter_dirs["a1"], loadable / "a3")
    broken = loadable / "broken"
    shutil.copytree(case.adapter_dirs["a2"], broken)
    cfg = json.loads((broken / "adapter_config.json").read_text())
    cfg["r"] = "eight"  # a rank that is not a number: the loader's message names it
    (broken / "adapter_config.json").write_text(json.dumps(cfg))
    outside = root / "outside"
    shutil.copytree(case.adapter_dirs["a1"], outside)
    os.symlink(outside, loadable / "escape")
    case.loadable = loadable
    return case


def offline_engine(case):
    """The engine the server runs, in this process, for reference outputs."""
    from moelora_dist.engine.engine import Engine

    return Engine.from_pretrained(str(case.model_dir), adapters={
        n: str(p) for n, p in case.adapter_dirs.items()}, device="cpu", progress=False,
        max_loras=2, max_rank=8)


def greedy(engine, prompts, adapters, max_tokens):
    """``[(output ids, text)]`` of greedy generation, one per prompt."""
    from moelora_dist.engine.sampling_params import SamplingParams

    params = [SamplingParams(max_tokens=m, temperature=0.0) for m in max_tokens]
    outs = engine.generate(list(prompts), params, list(adapters))
    return [(c.output_ids, c.text or "") for c in outs]


class Server:
    """``moelora-dist serve`` (or the launcher running it) as a subprocess on 127.0.0.1.

    ``argv``: the serve options; ``launch``: the launcher options to run it under (None: one
    process). The process runs in its own session; leaving the block SIGKILLs its group."""

    def __init__(self, argv: list[str], log_path: Path, *, api_key: str | None = None,
                 launch: list[str] | None = None):
        self.port = free_port()
        self.api_key = api_key
        serve = ["serve", *argv, "--port", str(self.port), "--device", "cpu"]
        if api_key:
            serve += ["--api-key", api_key]
        self.cmd = ([sys.executable, "-m", "launch", "--device", "cpu", *launch, *serve]
                    if launch is not None else
                    [sys.executable, "-m", "moelora_dist.cli.main", *serve])
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None
        self.url = f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> "Server":
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(self.cmd, cwd=ROOT, env=job_env(), stdout=self._log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + STARTUP_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.3)
        self.kill()
        raise AssertionError(f"server not healthy after {STARTUP_S} s:\n{self.log()}")

    def __exit__(self, *exc) -> None:
        self.kill()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(timeout=30)
        if not self._log.closed:
            self._log.close()

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text()[-4000:]

    def headers(self) -> dict:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def client(self, **kw):
        from openai import OpenAI

        return OpenAI(base_url=self.url + "/v1", api_key=self.api_key or "none", max_retries=0,
                      timeout=kw.pop("timeout", 60), **kw)

    def post(self, path: str, body, **kw) -> httpx.Response:
        content = body if isinstance(body, (bytes, str)) else json.dumps(body)
        return httpx.post(self.url + path, content=content, timeout=kw.pop("timeout", 60),
                          headers={**self.headers(), "Content-Type": "application/json",
                                   **kw.pop("headers", {})}, **kw)

    def metrics(self) -> dict[str, float]:
        """Every sample of /metrics, keyed by its name with labels."""
        text = httpx.get(self.url + "/metrics", headers=self.headers(), timeout=10).text
        out = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                key, _, value = line.rpartition(" ")
                out[key] = float(value)
        return out
