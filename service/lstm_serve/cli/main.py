"""lstm-serve command line: serve | health | train | export | models | predict | stream | forecast | bench.

Each subcommand's work lives in the module that owns it; this file only wires arguments.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Callable, Sequence
from typing import Any

from lstm_serve import __version__

# subcommand -> (module, help). The module defines add_arguments(parser) and run(args) -> int.
COMMANDS: dict[str, tuple[str, str]] = {
    "serve": ("lstm_serve.server.app", "run the gRPC server (the bundled models by default)"),
    "health": (
        "lstm_serve.cli.commands",
        "ask a server's gRPC health service (exit 0 when SERVING)",
    ),
    "models": ("lstm_serve.cli.commands", "list the model repository"),
    "predict": ("lstm_serve.cli.commands", "send steps from a CSV file or stdin in one request"),
    "stream": (
        "lstm_serve.cli.commands",
        "stream steps from a CSV file or stdin, a prediction per step",
    ),
    "forecast": ("lstm_serve.cli.commands", "roll a session forward H steps"),
    "train": ("lstm_serve.training.train", "train a model from models/<name>/train.toml"),
    "export": ("lstm_serve.training.export", "export a trained checkpoint to ONNX + manifest"),
    "bench": ("lstm_serve.bench.run", "benchmark lstm-serve against its ceilings"),
}


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The parser. Only the chosen subcommand's module is imported (when argv names one), so
    `lstm-serve health` starts quickly and one command's import error cannot break another."""
    argv = sys.argv[1:] if argv is None else argv
    chosen = next((a for a in argv if a in COMMANDS), None)
    parser = argparse.ArgumentParser(prog="lstm-serve", description=__doc__)
    parser.add_argument("--log-level", default=None, help="logging level (default INFO)")
    parser.add_argument("--version", action="version", version=f"lstm-serve {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module_name, _name=name)
        if chosen is None or name == chosen:
            module = importlib.import_module(module_name)
            adder: Callable[..., None] = (
                getattr(module, f"add_{name}_arguments", None) or module.add_arguments
            )
            adder(p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, str(args.log_level or "INFO").upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    module: Any = importlib.import_module(args._module)
    runner: Callable[[argparse.Namespace], int] = (
        getattr(module, f"run_{args._name}", None) or module.run
    )
    try:
        return int(runner(args))
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # a command-line user gets one line, not a traceback
        print(f"error: {describe(exc, args)}", file=sys.stderr)
        logging.getLogger(__name__).debug("%s failed", args._name, exc_info=True)
        return 1


def describe(exc: BaseException, args: argparse.Namespace) -> str:
    """One line for a failure: the gRPC status and its details, or the exception's message."""
    code = getattr(exc, "code", None)
    details = getattr(exc, "details", None)
    if callable(code) and callable(details):  # a grpc.RpcError, without importing grpc here
        where = getattr(args, "target", None)
        suffix = f" (server {where})" if where else ""
        return f"{code().name}: {details()}{suffix}"
    return str(exc) or type(exc).__name__


if __name__ == "__main__":
    sys.exit(main())
