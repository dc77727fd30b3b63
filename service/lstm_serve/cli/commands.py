"""Client-side commands: health, models, predict, stream, forecast."""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

import grpc
import numpy as np

from lstm_serve.client import Client, Connection, SessionStream, session_steps, step_request
from lstm_serve.server.settings import DEFAULT_MODELS


def _connection_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--target", default="127.0.0.1:50051", help="server address (default %(default)s)"
    )
    p.add_argument("--ca", type=Path, help="PEM CA to verify the server (enables TLS)")
    p.add_argument("--cert", type=Path, help="PEM client certificate (mutual TLS)")
    p.add_argument("--key", type=Path, help="PEM client key (mutual TLS)")
    p.add_argument("--token", help="bearer token (or env LSTM_SERVE_TOKEN)")
    p.add_argument(
        "--timeout", type=float, default=30.0, help="seconds per call (default %(default)s)"
    )


def _client(args: argparse.Namespace) -> Client:
    import os

    conn = Connection(
        args.target,
        root_certificates=args.ca.read_bytes() if args.ca else None,
        private_key=args.key.read_bytes() if args.key else None,
        certificate_chain=args.cert.read_bytes() if args.cert else None,
        token=args.token or os.environ.get("LSTM_SERVE_TOKEN") or None,
    )
    return Client(conn, timeout=args.timeout)


def _session_arguments(p: argparse.ArgumentParser) -> None:
    _connection_arguments(p)
    p.add_argument("--model", required=True, help="model name")
    p.add_argument("--version", default="", help="model version (default: the newest)")
    p.add_argument("--session", required=True, help="session id")


# -- health ------------------------------------------------------------------------------------


def add_health_arguments(p: argparse.ArgumentParser) -> None:
    _connection_arguments(p)
    p.set_defaults(timeout=3.0)
    p.add_argument("--service", default="", help="service or model name ('' = the server)")


def run_health(args: argparse.Namespace) -> int:
    try:
        with _client(args) as client:
            status = client.health(args.service)
    except grpc.RpcError as exc:
        print(f"{args.target}: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
    print(status)
    return 0 if status == "SERVING" else 1


# -- models ------------------------------------------------------------------------------------


def add_models_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "action",
        nargs="?",
        choices=["index", "load", "unload"],
        help="ask a running server (--target): its repository index, or load or unload a "
        "model (admin calls, model_control explicit); without: list a repository directory",
    )
    p.add_argument(
        "--model-repository", type=Path, default=DEFAULT_MODELS, help="repository directory"
    )
    p.add_argument("--json", action="store_true", help="print the manifests as JSON")
    p.add_argument("--model", help="with load or unload: the model name")
    p.add_argument(
        "--version", default="",
        help="with load or unload: one version (default: load applies the model's "
        "serving.toml, its version policy and labels; unload unloads every version)",
    )  # fmt: skip
    _connection_arguments(p)


def _model_control(args: argparse.Namespace) -> int:
    from lstm_serve.server.pb import grpc_service_pb2 as ipb
    from lstm_serve.server.pb import grpc_service_pb2_grpc as ipb_grpc

    if args.action != "index" and not args.model:
        print(f"error: models {args.action} needs --model", file=sys.stderr)
        return 2
    params = {}
    if args.version:
        params["version"] = ipb.ModelRepositoryParameter(string_param=args.version)
    with _client(args) as client:
        stub = ipb_grpc.GRPCInferenceServiceStub(client.channel)
        meta = client.conn.metadata
        try:
            if args.action == "index":
                index = stub.RepositoryIndex(
                    ipb.RepositoryIndexRequest(), timeout=args.timeout, metadata=meta
                )
                print(f"{'MODEL':<14}{'VERSION':<9}{'STATE':<13}REASON")
                for m in index.models:
                    print(f"{m.name:<14}{m.version:<9}{m.state:<13}{m.reason}")
            elif args.action == "load":
                stub.RepositoryModelLoad(
                    ipb.RepositoryModelLoadRequest(model_name=args.model, parameters=params),
                    timeout=args.timeout, metadata=meta,
                )  # fmt: skip
                what = f" version {args.version}" if args.version else " (its serving.toml applied)"
                print(f"loaded {args.model}{what}")
            else:
                stub.RepositoryModelUnload(
                    ipb.RepositoryModelUnloadRequest(model_name=args.model, parameters=params),
                    timeout=args.timeout, metadata=meta,
                )  # fmt: skip
                print(
                    f"unloading {args.model}{' version ' + args.version if args.version else ''}:"
                    " no new sessions; its sessions go on until the server's unload_drain_s"
                )
        except grpc.RpcError as exc:
            print(f"error: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
    return 0


def run_models(args: argparse.Namespace) -> int:
    from lstm_serve.core.repository import load_repository

    if args.action:
        return _model_control(args)

    repo = load_repository(args.model_repository)
    if args.json:
        print(json.dumps([mv.manifest.model_dump(mode="json") for mv in repo.all()], indent=2))
    else:
        print(
            f"{'MODEL':<14}{'VERSION':<9}{'KIND':<7}{'IN':>5}{'OUT':>6}{'LAYERS':>8}{'HIDDEN':>8}  PATH"
        )
        for mv in repo.all():
            m = mv.manifest
            print(
                f"{m.name:<14}{m.version:<9}{m.kind.value:<7}{m.input_dim:>5}{m.output_dim:>6}"
                f"{m.layers:>8}{m.hidden_size:>8}  {mv.directory}"
            )
            for line in held_out_lines(m.metrics):
                print(f"    {line}")
    for err in repo.errors:
        print(f"error: {err}", file=sys.stderr)
    return 1 if repo.errors or not repo.models else 0


def held_out_lines(metrics: dict[str, Any]) -> list[str]:
    """The manifest's held-out scores, the model first, then each baseline (lower is better)."""
    model, baselines = metrics.get("model"), metrics.get("baselines")
    if not isinstance(model, dict) or not isinstance(baselines, dict):
        return []
    lines = []
    if "horizons" in metrics:  # real models: MAE per horizon
        units = f" {metrics['units']}" if metrics.get("units") else ""
        for h in metrics["horizons"]:
            key = f"h{h}"
            scores = [("LSTM", model[key]["mae"])]
            scores += [(name, b[key]["mae"]) for name, b in baselines.items() if key in b]
            text = ", ".join(f"{name} {v:.3f}" for name, v in scores)
            lines.append(f"test MAE{units}, {h} step{'s' if h > 1 else ''} ahead: {text}")
    else:  # token models: bits per character on each test text the manifest scores
        code = metrics.get("held_out_code")
        code_name = f"held-out code ({code['source']})" if isinstance(code, dict) else ""
        for key, label in (
            ("test_bits_per_char", "test bits/char"),
            ("held_out_code_bits_per_char", f"{code_name} bits/char"),
        ):
            if key not in model:
                continue
            scores = [("LSTM", model[key])]
            scores += [(n, b[key]) for n, b in baselines.items() if key in b]
            lines.append(f"{label}: " + ", ".join(f"{n} {v:.3f}" for n, v in scores))
    return lines


# -- predict / stream --------------------------------------------------------------------------


def _input_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--input", default="-",
        help="CSV file of steps, one row per step (real models), or text (token models); - is stdin",
    )  # fmt: skip
    p.add_argument(
        "--top-k", type=int, default=3, help="token models: most likely next tokens shown"
    )


def _open_input(path: str) -> TextIO:
    return sys.stdin if path == "-" else open(path)


class InputError(ValueError):
    """A line of the input that is not a step; the message names it."""


def _csv_rows(f: TextIO, name: str) -> Iterator[list[float]]:
    """One row of numbers per line. Blank lines are skipped, and the first line when it is
    not numbers (a header); any other line that is not a row of finite numbers as long as the
    rows before it is an error: dropping it would shift every later step of the session."""
    width = 0
    for number, raw in enumerate(f, 1):
        line = raw.strip()
        if not line:
            continue
        try:
            row = [float(v) for v in line.split(",")]
        except ValueError as exc:
            if number == 1:
                continue  # a header
            raise InputError(
                f"{name} line {number} ({_shown(line)}) is not a row of numbers: {exc}"
            ) from None
        if not all(math.isfinite(v) for v in row):  # the server refuses NaN and Inf too
            raise InputError(f"{name} line {number} ({_shown(line)}) holds a NaN or Inf")
        if width and len(row) != width:
            raise InputError(
                f"{name} line {number} ({_shown(line)}) has {len(row)} values, the rows before "
                f"it {width}"
            )
        width = len(row)
        yield row


def _shown(line: str, limit: int = 80) -> str:
    return repr(line if len(line) <= limit else line[: limit - 3] + "...")


def _input_name(path: str) -> str:
    return "stdin" if path == "-" else path


def _vocab(client: Client, model: str, version: str) -> dict[str, int] | None:
    info = client.get_model(model, version)
    vocab = json.loads(info.manifest_json).get("vocab")
    return {t: i for i, t in enumerate(vocab)} if vocab else None


def _token_ids(text: str, vocab: dict[str, int]) -> list[int]:
    return [vocab.get(ch, 0) for ch in text]


def _print_outputs(
    seq: int, y: np.ndarray, top: list[list[tuple[int, float]]], names: list[str] | None
) -> None:
    if top:
        for i, entries in enumerate(top):
            shown = " ".join(f"{(names[t] if names else str(t))!r}:{p:.3f}" for t, p in entries)
            print(f"{seq + i},{shown}")
    else:
        for i, row in enumerate(y):
            print(f"{seq + i}," + ",".join(f"{v:.6g}" for v in row))


def add_predict_arguments(p: argparse.ArgumentParser) -> None:
    _session_arguments(p)
    _input_arguments(p)
    p.add_argument("--seq", type=int, default=None, help="index of the first step (exactly-once)")
    p.add_argument("--reset", action="store_true", help="start the session from a zero state")


def run_predict(args: argparse.Namespace) -> int:
    with _client(args) as client, _open_input(args.input) as f:
        vocab = _vocab(client, args.model, args.version)
        if vocab is not None:
            steps = session_steps(
                args.session, tokens=_token_ids(f.read(), vocab), seq=args.seq, reset=args.reset
            )
        else:
            rows = list(_csv_rows(f, _input_name(args.input)))  # all checked before sending
            steps = session_steps(args.session, rows, seq=args.seq, reset=args.reset)
        [out] = client.step(
            step_request(args.model, [steps], args.version, top_k=args.top_k if vocab else 0)
        )
        _print_outputs(out.seq, out.y, out.top_k, list(vocab) if vocab else None)
    return 0


def add_stream_arguments(p: argparse.ArgumentParser) -> None:
    _session_arguments(p)
    _input_arguments(p)
    p.add_argument("--chunk", type=int, default=1, help="steps per message (default %(default)s)")


def run_stream(args: argparse.Namespace) -> int:
    with _client(args) as client, _open_input(args.input) as f:
        vocab = _vocab(client, args.model, args.version)
        names = list(vocab) if vocab else None
        stream = SessionStream(client, args.model, args.session, args.version)
        k = args.top_k if vocab else 0
        with stream:
            if vocab is not None:
                ids = _token_ids(f.read(), vocab)
                for i in range(0, len(ids), args.chunk):
                    out = stream.send(tokens=ids[i : i + args.chunk], top_k=k)
                    _print_outputs(out.seq, out.y, out.top_k, names)
            else:
                chunk: list[list[float]] = []
                sent = 0
                try:
                    for row in _csv_rows(f, _input_name(args.input)):
                        chunk.append(row)
                        if len(chunk) == args.chunk:
                            out = stream.send(chunk)
                            _print_outputs(out.seq, out.y, out.top_k, names)
                            sent, chunk = sent + len(chunk), []
                except InputError as exc:
                    # Streaming: the lines before it have been sent as they came (the rest of
                    # their chunk too, so the session stops right before the bad line).
                    if chunk:
                        out = stream.send(chunk)
                        _print_outputs(out.seq, out.y, out.top_k, names)
                        sent += len(chunk)
                    raise InputError(
                        f"{exc}; the {sent} step(s) before it were sent (the session is at "
                        f"step {stream.next_seq}), nothing from it on"
                    ) from None
                if chunk:
                    out = stream.send(chunk)
                    _print_outputs(out.seq, out.y, out.top_k, names)
    return 0


# -- forecast ----------------------------------------------------------------------------------


def add_forecast_arguments(p: argparse.ArgumentParser) -> None:
    _session_arguments(p)
    p.add_argument("--horizon", type=int, required=True, help="steps to roll forward")
    p.add_argument("--temperature", type=float, default=0.0, help="token models: 0 = greedy")
    p.add_argument(
        "--sample-top-k", type=int, default=0, help="token models: sample among the k best"
    )
    p.add_argument("--seed", type=int, default=0, help="token models: sampling seed")
    p.add_argument("--commit", action="store_true", help="apply the forecast to the session")


def run_forecast(args: argparse.Namespace) -> int:
    with _client(args) as client:
        vocab = _vocab(client, args.model, args.version)
        out = client.forecast(
            args.model, args.session, args.horizon, version=args.version,
            temperature=args.temperature, top_k=args.sample_top_k, seed=args.seed,
            commit=args.commit,
        )  # fmt: skip
        if vocab is not None:
            names = list(vocab)
            print("".join(names[t] if len(names[t]) == 1 else "\ufffd" for t in out.tokens))
        else:
            for row in out.y:
                print(",".join(f"{v:.6g}" for v in row))
    return 0
