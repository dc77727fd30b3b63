"""A version rolled out under load (issue: model versions that come and go live): 64 sessions
step without pause and new ones keep arriving while version 2 is loaded and becomes the
default, then version 1 is unloaded with a drain deadline. A real server on a loopback port,
real clients; every answer is compared with one pass of the NumPy reference over the weights
of the version the session (re)started on.

What must hold: no request fails before the drain deadline; each session stays on the version
it started on; sessions started after the load get version 2; after the deadline, a step on
version 1 gets FAILED_PRECONDITION naming the version, and the same session sent with reset
continues on version 2.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np

from lstm_serve.client import AsyncClient
from lstm_serve.server.pb import grpc_service_pb2 as ipb
from lstm_serve.server.pb import grpc_service_pb2_grpc as ipb_grpc
from tests.helpers.models import add_version
from tests.helpers.server import ServerThread
from tests.oracle.one_pass import OnePass

ATOL = 1e-5
DRAIN_S = 3.0
STREAMS = 64


@dataclass
class Segment:
    """A session's steps from its start (or a reset) on: one version throughout."""

    started: float  # time.monotonic() of its first request
    version: str = ""
    x: list[np.ndarray] = field(default_factory=list)
    y: list[np.ndarray] = field(default_factory=list)
    versions: set[str] = field(default_factory=set)


@dataclass
class Log:
    segments: dict[str, list[Segment]] = field(default_factory=dict)
    # (time the failure was received, session, status code, details) of every failed request
    errors: list[tuple[float, str, grpc.StatusCode, str]] = field(default_factory=list)


async def stream(c: AsyncClient, sid: str, seed: int, log: Log, stop: asyncio.Event) -> None:
    rng = np.random.default_rng(seed)
    segs = log.segments.setdefault(sid, [])
    reset = False
    while not stop.is_set():
        x = rng.normal(size=(1, 3)).astype(np.float32)
        sent = time.monotonic()
        try:
            r = await c.predict("tiny", sid, x, reset=reset)
        except grpc.RpcError as exc:
            log.errors.append((time.monotonic(), sid, exc.code(), exc.details() or ""))
            reset = exc.code() is grpc.StatusCode.FAILED_PRECONDITION
            if not reset:
                return
            continue
        if reset or not segs:
            segs.append(Segment(sent))
        reset = False
        seg = segs[-1]
        seg.x.append(x)
        seg.y.append(r.y)
        seg.versions.add(r.version)
        await asyncio.sleep(0)


async def admin(target: str, call: str, version: str) -> None:
    async with grpc.aio.insecure_channel(target) as ch:
        stub = ipb_grpc.GRPCInferenceServiceStub(ch)
        if call == "load":
            p = {"version": ipb.ModelRepositoryParameter(string_param=version)}
            await stub.RepositoryModelLoad(
                ipb.RepositoryModelLoadRequest(model_name="tiny", parameters=p), timeout=60
            )
        else:
            p = {"version": ipb.ModelRepositoryParameter(int64_param=int(version))}
            await stub.RepositoryModelUnload(
                ipb.RepositoryModelUnloadRequest(model_name="tiny", parameters=p), timeout=60
            )


def test_a_rollout_under_load_fails_nothing_before_the_deadline(tiny_repo_copy: Path) -> None:
    repo = tiny_repo_copy
    v1 = OnePass(repo / "tiny" / "1")
    log = Log()
    marks: dict[str, float] = {}

    async def main(target: str) -> None:
        stop = asyncio.Event()
        async with AsyncClient(target) as c:
            tasks = [asyncio.create_task(stream(c, f"s{i}", i, log, stop)) for i in range(STREAMS)]

            async def arrivals() -> None:  # new sessions, one every 100 ms
                i = 0
                while not stop.is_set():
                    tasks.append(asyncio.create_task(stream(c, f"n{i}", 1000 + i, log, stop)))
                    i += 1
                    await asyncio.sleep(0.1)

            tasks.append(asyncio.create_task(arrivals()))
            await asyncio.sleep(1.0)
            await asyncio.to_thread(add_version, repo, "2")
            await admin(target, "load", "2")  # the newest: the default from now on
            marks["loaded"] = time.monotonic()
            await asyncio.sleep(1.0)
            marks["unload"] = time.monotonic()
            await admin(target, "unload", "1")
            marks["deadline"] = marks["unload"] + DRAIN_S
            await asyncio.sleep(DRAIN_S + 1.5)
            stop.set()
            await asyncio.gather(*tasks)

    with ServerThread(
        model_repository=repo, model_control="explicit", unload_drain_s=DRAIN_S
    ) as srv:
        asyncio.run(main(srv.target))
    v2 = OnePass(repo / "tiny" / "2")
    passes = {"1": v1, "2": v2}

    # Nothing failed before the deadline, and after it only steps on version 1, as documented.
    # (The server's deadline is DRAIN_S after it got the unload, so after marks["unload"].)
    for received, sid, code, details in log.errors:
        assert received >= marks["unload"] + DRAIN_S, (sid, code, details)
        assert code is grpc.StatusCode.FAILED_PRECONDITION, (sid, code, details)
        assert "'1' was unloaded; send the session's next step with reset" in details
    # Every segment ran on one version, and gave one pass of it over its inputs.
    steps = 0
    for sid, segs in log.segments.items():
        for seg in segs:
            assert len(seg.versions) == 1, (sid, seg.versions)
            (version,) = seg.versions
            x = np.concatenate(seg.x)
            np.testing.assert_allclose(
                np.concatenate(seg.y), passes[version].run(x)[0], atol=ATOL, err_msg=sid
            )
            steps += len(x)
            if seg.started > marks["loaded"]:
                assert version == "2", sid  # new sessions after the load: version 2
    # The first 64 started on version 1, were refused after the deadline, and went on on 2.
    refused = {sid for _, sid, _, _ in log.errors}
    for i in range(STREAMS):
        segs = log.segments[f"s{i}"]
        assert segs[0].versions == {"1"}
        assert f"s{i}" in refused and [s.versions for s in segs[1:]] == [{"2"}], f"s{i}"
    assert steps > 5 * STREAMS  # the load really ran
    print(
        f"rollout: {len(log.segments)} sessions, {steps} steps, "
        f"{sum(len(v) for v in log.segments.values())} segments; refused after the deadline "
        f"{len(log.errors)}, before it 0"
    )
