"""The Open Inference Protocol's HTTP/REST form (KServe v2 REST, as Triton's HTTP endpoint serves
it, with the binary tensor extension), on a port of its own over the same engine and sessions.

Not a third translator: a JSON request becomes the same `inference.ModelInferRequest` the gRPC
form receives and goes through `InferenceServicer.infer` (kserve_convert's decoding, limits and
errors); its `ModelInferResponse` is written out as JSON (and binary tensors). `HttpFront` is
plain request -> reply logic; `HttpServer` serves it with aiohttp on the gRPC server's loop.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import socket
import ssl
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from aiohttp import web
from google.protobuf.json_format import MessageToDict

from lstm_serve.core.engine import Engine
from lstm_serve.core.errors import InvalidArgument, ServiceError
from lstm_serve.server import kserve_convert as K
from lstm_serve.server.convert import F32
from lstm_serve.server.interceptors import Authenticator
from lstm_serve.server.kserve import EXTENSIONS, InferenceServicer, _version
from lstm_serve.server.limits import MAX_RESPONSE_KEY, answer_limit
from lstm_serve.server.pb import grpc_service_pb2 as ipb
from lstm_serve.server.statistics import ModelStats

logger = logging.getLogger(__name__)

JSON = "application/json"
OCTETS = "application/octet-stream"
# The binary tensor extension: the JSON part's length, when binary tensors follow it.
HEADER_LENGTH = "Inference-Header-Content-Length"
HTTP_EXTENSIONS = [*EXTENSIONS, "binary_tensor_data"]
# HTTP-only request parameters, not passed to the translator.
BINARY_OUTPUT = "binary_data_output"
BINARY = "binary_data"
BINARY_SIZE = "binary_data_size"

# The HTTP status of each gRPC status code (KServe v2 REST / Triton's HTTP endpoint).
STATUS = {
    "INVALID_ARGUMENT": 400,
    "FAILED_PRECONDITION": 400,
    "OUT_OF_RANGE": 400,
    "NOT_FOUND": 404,
    "ALREADY_EXISTS": 409,
    "ABORTED": 409,
    "RESOURCE_EXHAUSTED": 429,
    "UNAVAILABLE": 503,
    "UNAUTHENTICATED": 401,
    "PERMISSION_DENIED": 403,
    "DEADLINE_EXCEEDED": 504,
    "UNIMPLEMENTED": 501,
}

_MODEL = re.compile(
    r"^/v2/models/(?P<name>[^/]+)(?:/versions/(?P<version>[^/]+))?"
    r"(?P<op>/ready|/infer|/config|/stats)?$"
)
# The statistics extension: every loaded version of every model (as Triton, this path is not
# the metadata of a model named "stats").
ALL_STATS = "/v2/models/stats"


@dataclass(frozen=True, slots=True)
class Reply:
    status: int
    body: bytes = b""
    content_type: str = JSON
    headers: tuple[tuple[str, str], ...] = ()


def _json(doc: Any, status: int = 200) -> Reply:
    return Reply(status, json.dumps(doc, separators=(",", ":")).encode())


def error_reply(status: int, message: str) -> Reply:
    return _json({"error": message}, status)


def _health(ok: bool) -> Reply:
    # KServe v2: the status is the answer (200 true, 4xx false), with an empty body.
    return Reply(200 if ok else 400)


# -- JSON -> ModelInferRequest -----------------------------------------------------------------


def _set_param(p: Any, key: str, value: Any) -> None:
    if isinstance(value, bool):
        p.bool_param = value
    elif isinstance(value, int):
        if -(2**63) <= value < 2**63:
            p.int64_param = value
        elif 0 <= value < 2**64:
            p.uint64_param = value
        else:
            raise InvalidArgument(f"parameter '{key}' is out of the 64-bit integer range")
    elif isinstance(value, str):
        p.string_param = value
    elif isinstance(value, float):
        p.double_param = value
    else:
        raise InvalidArgument(f"parameter '{key}' must be a bool, a number or a string")


def _object(value: Any, what: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidArgument(f"{what} must be a JSON object")
    return value


def _list(value: Any, what: str) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise InvalidArgument(f"{what} must be a JSON array")
    return value


def _contents(t: Any, data: Any) -> None:
    """JSON data (flat or nested, row-major) into the typed contents of its datatype. Other
    datatypes are left empty: the translator refuses them, naming the ones the model takes."""
    name, dt = t.name, t.datatype
    target = {
        "FP32": t.contents.fp32_contents,
        "INT64": t.contents.int64_contents,
        "INT32": t.contents.int_contents,
    }.get(dt)
    if target is None:
        return
    try:
        arr = np.asarray(data)
    except (ValueError, TypeError, OverflowError):
        arr = np.asarray([object()])
    kinds = "iu" if dt.startswith("INT") else "iuf"
    if arr.size and arr.dtype.kind not in kinds:
        what = "integers" if dt.startswith("INT") else "numbers"
        raise InvalidArgument(f"input '{name}': data must be a (nested) array of {what} ({dt})")
    try:
        target.extend(arr.ravel().tolist())
    except (ValueError, TypeError, OverflowError):
        raise InvalidArgument(f"input '{name}': a value is out of the range of {dt}") from None


def infer_request(
    name: str, version: str, body: bytes, header_length: str | None
) -> tuple[ipb.ModelInferRequest, dict[str, bool], bool]:
    """The request as the gRPC form's message, the outputs asked for in binary (by name), and
    the default for the others (`binary_data_output`)."""
    if header_length is None:
        head, tail = body, b""
    else:
        try:
            n = int(header_length)
        except ValueError:
            n = -1
        if not 0 <= n <= len(body):
            raise InvalidArgument(
                f"{HEADER_LENGTH} is {header_length!r}: it must be a byte count within the "
                f"body's {len(body)} bytes"
            )
        head, tail = body[:n], body[n:]
    try:
        doc = json.loads(head)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidArgument(f"the request is not valid JSON: {exc}") from None
    doc = _object(doc, "the request")
    req = ipb.ModelInferRequest(model_name=name, model_version=version)
    rid = doc.get("id")
    if rid is not None:
        if not isinstance(rid, str):
            raise InvalidArgument("id must be a string")
        req.id = rid
    params = _object(doc.get("parameters"), "parameters")
    default_binary = params.get(BINARY_OUTPUT, False)
    if not isinstance(default_binary, bool):
        raise InvalidArgument(f"parameter '{BINARY_OUTPUT}' must be a bool")
    for key, value in params.items():
        if key != BINARY_OUTPUT:
            _set_param(req.parameters[key], key, value)
    offset = 0
    for i, tj in enumerate(_list(doc.get("inputs"), "inputs")):
        tj = _object(tj, f"inputs[{i}]")
        t = req.inputs.add()
        tname, dt, shape = tj.get("name"), tj.get("datatype"), _list(tj.get("shape"), "shape")
        if not isinstance(tname, str) or not isinstance(dt, str):
            raise InvalidArgument(f"inputs[{i}] needs a name and a datatype (strings)")
        if not all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
            raise InvalidArgument(f"input '{tname}': shape must be an array of integers")
        t.name, t.datatype = tname, dt
        try:
            t.shape.extend(shape)
        except ValueError:
            raise InvalidArgument(f"input '{tname}': shape is out of range") from None
        tparams = _object(tj.get("parameters"), f"input '{tname}' parameters")
        size = tparams.get(BINARY_SIZE)
        if size is not None:
            if isinstance(size, bool) or not isinstance(size, int) or size < 0:
                raise InvalidArgument(f"input '{tname}': {BINARY_SIZE} must be an integer >= 0")
            if offset + size > len(tail):
                raise InvalidArgument(
                    f"input '{tname}': {BINARY_SIZE} {size} runs past the {len(tail)} bytes of "
                    f"binary data after the JSON header"
                )
            req.raw_input_contents.append(tail[offset : offset + size])
            offset += size
        elif "data" in tj:
            _contents(t, tj["data"])
        else:
            raise InvalidArgument(f"input '{tname}' has neither data nor {BINARY_SIZE}")
    if offset != len(tail):
        raise InvalidArgument(
            f"{len(tail)} bytes of binary data follow the JSON header; the inputs' "
            f"{BINARY_SIZE} take {offset}"
        )
    binary: dict[str, bool] = {}
    for i, oj in enumerate(_list(doc.get("outputs"), "outputs")):
        oj = _object(oj, f"outputs[{i}]")
        oname = oj.get("name")
        if not isinstance(oname, str):
            raise InvalidArgument(f"outputs[{i}] needs a name (a string)")
        o = req.outputs.add(name=oname)
        for key, value in _object(oj.get("parameters"), f"output '{oname}' parameters").items():
            if key == BINARY:
                if not isinstance(value, bool):
                    raise InvalidArgument(f"output '{oname}': {BINARY} must be a bool")
                binary[oname] = value
            else:
                _set_param(o.parameters[key], key, value)
    return req, binary, default_binary


# -- ModelInferResponse -> JSON (+ binary tensors) ---------------------------------------------


def _param_value(p: Any) -> Any:
    which = p.WhichOneof("parameter_choice")
    return None if which is None else getattr(p, which)


def _bytes_items(raw: bytes) -> list[bytes]:
    items, i = [], 0
    while i < len(raw):
        (n,) = struct.unpack_from("<I", raw, i)
        items.append(raw[i + 4 : i + 4 + n])
        i += 4 + n
    return items


def _output(t: Any, raw: bytes | None, binary: bool) -> tuple[Any, bytes | None]:
    """An output's JSON data, or its binary form."""
    if t.datatype == "BYTES":
        items = _bytes_items(raw) if raw is not None else list(t.contents.bytes_contents)
        if binary:
            return None, raw if raw is not None else K._bytes_raw(np.array(items, object))
        return [b.decode("utf-8", "replace") for b in items], None
    y = np.frombuffer(raw, F32) if raw is not None else np.asarray(t.contents.fp32_contents, F32)
    return (None, y.tobytes()) if binary else (y.tolist(), None)


def infer_reply(
    resp: ipb.ModelInferResponse, binary: dict[str, bool], default_binary: bool
) -> Reply:
    doc: dict[str, Any] = {"model_name": resp.model_name, "model_version": resp.model_version}
    if resp.id:
        doc["id"] = resp.id
    if resp.parameters:
        doc["parameters"] = {k: _param_value(v) for k, v in resp.parameters.items()}
    outputs, blobs = [], []
    raws = list(resp.raw_output_contents)
    for i, t in enumerate(resp.outputs):
        raw = raws[i] if raws else None
        data, blob = _output(t, raw, binary.get(t.name, default_binary))
        o: dict[str, Any] = {"name": t.name, "datatype": t.datatype, "shape": list(t.shape)}
        if blob is not None:
            o["parameters"] = {BINARY_SIZE: len(blob)}
            blobs.append(blob)
        else:
            o["data"] = data
        outputs.append(o)
    doc["outputs"] = outputs
    head = json.dumps(doc, separators=(",", ":")).encode()
    if not blobs:
        return Reply(200, head)
    return Reply(200, head + b"".join(blobs), OCTETS, ((HEADER_LENGTH, str(len(head))),))


def stats_reply(stats: list[ModelStats]) -> Reply:
    """Triton's JSON for the statistics extension: the gRPC form's fields, with numbers as JSON
    numbers (MessageToDict would write uint64 as strings) and no batch statistics."""
    return _json({"model_stats": [dataclasses.asdict(s) | {"batch_stats": []} for s in stats]})


# -- routing -----------------------------------------------------------------------------------


class HttpFront:
    """KServe v2 REST requests -> replies, over the gRPC form's servicer and its engine."""

    def __init__(self, servicer: InferenceServicer, auth: Authenticator | None) -> None:
        self.servicer = servicer
        self.engine: Engine = servicer.engine
        self.auth = auth
        self.draining = False  # set first at a graceful stop: ready fails before anything stops

    async def handle(
        self,
        method: str,
        path: str,
        headers: Mapping[str, str],
        body: bytes,
        common_name: Callable[[], str | None] = lambda: None,
    ) -> Reply:
        """Never raises (but for cancellation): errors become {"error": ...} replies."""
        try:
            return await self._route(method, path, headers, body, common_name)
        except ServiceError as exc:
            status = STATUS.get(exc.code, 500)
            return error_reply(status, exc.message if status != 500 else "internal error")
        except Exception:
            logger.exception("HTTP %s %s failed", method, path)
            return error_reply(500, "internal error")

    async def _route(
        self,
        method: str,
        path: str,
        headers: Mapping[str, str],
        body: bytes,
        common_name: Callable[[], str | None],
    ) -> Reply:
        want = "POST" if path.endswith("/infer") else "GET"
        if method not in (want, "HEAD" if want == "GET" else want):
            return error_reply(405, f"{path} takes {want}, not {method}")
        # Health is open, as grpc.health.v1 is: probes carry no token.
        if path == "/v2/health/live":
            return _health(True)
        if path == "/v2/health/ready":
            return _health(self.engine.ready and not self.draining)
        principal = (
            self.auth.principal(headers.get("authorization"), common_name) if self.auth else ""
        )
        if path == "/v2":
            return _json({"name": "lstm-serve", "version": _version(), "extensions": HTTP_EXTENSIONS})  # fmt: skip
        if path == ALL_STATS:
            return stats_reply(self.servicer.stats("", ""))
        m = _MODEL.match(path)
        if m is None:
            return error_reply(404, f"no such endpoint: {path}")
        name, version, op = m["name"], m["version"] or "", m["op"]
        if op == "/ready":
            return _health(not self.draining and self.engine.model_ready(name, version))
        if op == "/stats":
            return stats_reply(self.servicer.stats(name, version))
        if op == "/infer":
            req, binary, default_binary = infer_request(
                name, version, body, headers.get(HEADER_LENGTH)
            )
            given = headers.get(MAX_RESPONSE_KEY)
            limit = answer_limit(
                [(MAX_RESPONSE_KEY, given)] if given is not None else (),
                self.servicer.max_message_bytes,
            )
            resp = await self.servicer.infer(req, principal, None, limit, K.http_error)
            return infer_reply(resp, binary, default_binary)
        try:
            mv = self.engine.get_model(name, version)
        except ServiceError as exc:
            raise K.http_error(exc, name, version) from None
        if op == "/config":
            s = self.engine.settings
            config = K.model_config(mv, s.max_sessions_per_request, s.session_ttl_s)
            return _json({"config": MessageToDict(config, preserving_proto_field_name=True)})
        versions = [
            v.manifest.version for v in self.engine.list_models() if v.manifest.name == name
        ]
        md = K.model_metadata(mv, versions)

        def tensors(ts: Any) -> list[dict[str, Any]]:
            return [{"name": t.name, "datatype": t.datatype, "shape": list(t.shape)} for t in ts]

        return _json(
            {
                "name": md.name, "versions": list(md.versions), "platform": md.platform,
                "inputs": tensors(md.inputs), "outputs": tensors(md.outputs),
            }
        )  # fmt: skip


# -- the server --------------------------------------------------------------------------------


def bind(host: str, port: int) -> socket.socket:
    """A listening socket, bound before the models load (connections wait in its backlog until
    the server starts); OSError when the address cannot be had."""
    h = host.strip("[]")
    v6 = ":" in h
    return socket.create_server(
        (h, port),
        family=socket.AF_INET6 if v6 else socket.AF_INET,
        dualstack_ipv6=v6 and h in ("::", "") and socket.has_dualstack_ipv6(),
        backlog=1024,
    )


def ssl_context(cert: Path, key: Path, client_ca: Path | None) -> ssl.SSLContext:
    """The gRPC port's TLS settings, as an ssl context: server cert and key, and with a client
    CA, mTLS (a client must present a certificate it signed)."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    if client_ca is not None:
        ctx.load_verify_locations(client_ca)
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def _common_name(request: web.BaseRequest) -> Callable[[], str | None]:
    def cn() -> str | None:
        transport = request.transport
        cert = transport.get_extra_info("peercert") if transport is not None else None
        for rdn in (cert or {}).get("subject", ()):
            for key, value in rdn:
                if key == "commonName":
                    return str(value)
        return None

    return cn


class HttpServer:
    """HttpFront on aiohttp's server, on the running loop (the gRPC server's)."""

    def __init__(
        self,
        front: HttpFront,
        sock: socket.socket,
        ssl_ctx: ssl.SSLContext | None,
        max_body_bytes: int,
    ) -> None:
        self.front = front
        self.sock = sock
        self.ssl_ctx = ssl_ctx
        self.max_body_bytes = max_body_bytes
        self.port: int = sock.getsockname()[1]
        self._runner: web.BaseRunner | None = None

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            r = error_reply(
                413, f"the request is larger than the {self.max_body_bytes} bytes allowed "
                "(max_message_bytes)",
            )  # fmt: skip
        else:
            r = await self.front.handle(
                request.method, request.path, request.headers, body, _common_name(request)
            )
        return web.Response(
            status=r.status, body=r.body, content_type=r.content_type, headers=dict(r.headers)
        )

    async def start(self, shutdown_timeout: float) -> None:
        # One catch-all route: HttpFront routes (the same paths whatever serves them).
        app = web.Application(client_max_size=self.max_body_bytes)
        app.router.add_route("*", "/{path:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=shutdown_timeout)
        await self._runner.setup()
        site = web.SockSite(self._runner, self.sock, ssl_context=self.ssl_ctx)
        await site.start()

    async def stop(self) -> None:
        """Stop listening, give requests in flight the shutdown timeout, close connections."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        self.sock.close()
