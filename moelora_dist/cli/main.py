"""moelora-dist: many LoRA adapters at once on the MoE layers of a TP/EP-split model.

    moelora-dist layout --world 8 --tp 8 --ep 2 --experts 128 --intermediate 768
    moelora-dist inspect-adapter DIR [--model-config config.json]
    moelora-dist sweep [--simulate]
    moelora-dist logits --model DIR --adapter NAME=DIR --requests R.jsonl --out O.safetensors
    moelora-dist generate --model DIR --adapter NAME=DIR --requests R.jsonl --out O.jsonl
    moelora-dist serve --model DIR --adapter NAME=DIR [--host 127.0.0.1 --port 8000]
    moelora-dist tune-kernels --shape qwen3-30b-a3b --lora --out tuned.json

Each subcommand lives in ``moelora_dist/cli/<name>.py`` and defines ``add_arguments(parser)``
and ``main(args) -> int``; a module is imported only when its command runs (start-up time).
A user mistake anywhere (the :class:`~moelora_dist.errors.MoeloraError` family) is one line on
stderr and exit code 2; a bad option is argparse's usage line, also exit 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from moelora_dist.cli.common import close_progress_bars
from moelora_dist.errors import MoeloraError, report_user_error

COMMANDS = {
    "layout": ("layout", "print the rank table of a (world, tp, ep) layout"),
    "inspect-adapter": ("inspect_adapter", "describe a PEFT adapter directory"),
    "sweep": ("sweep", "EP/TP correctness sweep against the single-process reference"),
    "logits": ("logits", "prompt logits of a batch of requests with mixed adapters"),
    "generate": ("generate", "generation (greedy unless asked) of requests with mixed adapters"),
    "serve": ("serve", "OpenAI-compatible HTTP server; each adapter is a model"),
    "tune-kernels": ("tune_kernels", "measure the MoE LoRA kernels' tile configs on this GPU"),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="moelora-dist", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="commands:\n" + "\n".join(
                                         f"  {n:<16} {h}" for n, (_, h) in COMMANDS.items()))
    parser.add_argument("command", choices=list(COMMANDS), metavar="COMMAND",
                        help="one of the commands below; 'moelora-dist COMMAND --help' for its "
                             "options")
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0 if argv else 2
    ns, rest = parser.parse_known_args(argv[:1])
    module = importlib.import_module(f"moelora_dist.cli.{COMMANDS[ns.command][0]}")
    sub = argparse.ArgumentParser(prog=f"moelora-dist {ns.command}",
                                  description=COMMANDS[ns.command][1])
    module.add_arguments(sub)
    args = sub.parse_args(argv[1:])
    try:
        return int(module.main(args) or 0)
    except MoeloraError as exc:
        close_progress_bars()
        return report_user_error(f"moelora-dist {ns.command}", exc)


if __name__ == "__main__":
    sys.exit(main())
