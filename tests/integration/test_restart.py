"""Restart (invariant 7, docs/architecture.md) against a real `lstm-serve serve` subprocess.

SIGTERM: drain, snapshot, exit; a start on the same snapshot directory continues every session
exactly. SIGKILL: what survives is the last periodic snapshot, and GetSession's next_seq says
exactly which steps that is. Bad snapshot files never stop a server from starting, and a
snapshot file is replaced atomically.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from pathlib import Path
from typing import Any, cast

import grpc
import numpy as np
import pytest

from lstm_serve.client import Client, session_steps, step_request
from lstm_serve.core.engine import LoadedModel
from lstm_serve.core.policy import POLICY_FILE
from lstm_serve.core.repository import load_repository
from lstm_serve.core.snapshot import write_snapshot
from lstm_serve.core.store import Captured, CapturedReplay
from tests.helpers.models import add_version
from tests.helpers.proxy import ServeProcess, health_status
from tests.helpers.server import ServerThread
from tests.oracle.one_pass import OnePass

ATOL = 1e-5


@pytest.fixture(scope="module")
def oracles(oracle: OnePass, tok_oracle: OnePass) -> dict[str, OnePass]:
    return {"tiny": oracle, "tinytok": tok_oracle}


def read_snapshot(path: Path) -> dict[str, int]:
    """session key -> next_seq, as written in a snapshot file."""
    with np.load(path, allow_pickle=False) as z:
        keys = json.loads(str(z["keys"]))
        return dict(zip(keys, z["next_seq"].tolist(), strict=True))


def _inputs(rng: np.random.Generator, length: int) -> dict[tuple[str, str], np.ndarray]:
    xs: dict[tuple[str, str], np.ndarray] = {}
    for i in range(4):
        xs[("tiny", f"r{i}")] = rng.normal(size=(length, 3)).astype(np.float32)
    for i in range(2):
        xs[("tinytok", f"t{i}")] = rng.integers(0, 12, size=length).astype(np.int64)
    return xs


def _send(c: Client, model: str, sid: str, x: np.ndarray, seq: int) -> np.ndarray:
    if model == "tinytok":
        return c.predict(model, sid, tokens=x.tolist(), seq=seq).y
    return c.predict(model, sid, x, seq=seq).y


def test_sigterm_restart_continues_every_session_exactly(
    tiny_repo: Path, tmp_path: Path, oracles: dict[str, OnePass]
) -> None:
    snap = tmp_path / "snap"
    xs = _inputs(np.random.default_rng(11), 30)
    bounds = [0, 11, 19, 30]  # three phases, two restarts in between
    outputs: dict[tuple[str, str], list[np.ndarray]] = {k: [] for k in xs}
    proc = ServeProcess(tiny_repo, tmp_path / "serve.log", snapshot_dir=snap)
    proc.start()
    try:
        rc, out = proc.cli_health()
        assert (rc, out) == (0, "SERVING")
        for phase in range(3):
            a, b = bounds[phase], bounds[phase + 1]
            with Client(proc.target, timeout=10) as c:
                if phase:
                    _retries_after_restart(c, xs, outputs, bounds[phase - 1], a)
                for (model, sid), x in xs.items():
                    if phase:  # the restarted server knows exactly where each session was
                        st = c.get_session(model, sid)
                        assert st.exists and st.next_seq == a, (sid, st)
                    if model == "tiny":  # a resumable stream numbers itself from GetSession
                        with c.session(model, sid) as stream:
                            for k in range(a, b, 4):
                                res = stream.send(x[k : min(k + 4, b)])
                                outputs[(model, sid)].append(res.y)
                    else:
                        outputs[(model, sid)].append(_send(c, model, sid, x[a:b], a))
            if phase < 2:
                assert proc.terminate() == 0
                assert sorted(p.name for p in snap.iterdir()) == ["tiny-1.npz", "tinytok-1.npz"]
                assert read_snapshot(snap / "tiny-1.npz") == {f"r{i}": b for i in range(4)}
                proc.start()
        rc, out = proc.cli_health()
        assert (rc, out) == (0, "SERVING")
    finally:
        proc.terminate()
    for (model, sid), x in xs.items():
        y = oracles[model].run(x)[0]
        np.testing.assert_allclose(np.concatenate(outputs[(model, sid)]), y, atol=ATOL)
    assert "Traceback" not in proc.log()


def test_sigterm_restart_keeps_sessions_on_their_version(
    tiny_repo_copy: Path, tmp_path: Path
) -> None:
    """A session on version 1 goes on on version 1 after a restart whose serving.toml loads
    only version 2 (version 1 is loaded for its snapshot's sessions, and drains); new sessions
    start on 2; once its last session ends version 1 is freed and its snapshot deleted."""
    repo, snap = tiny_repo_copy, tmp_path / "snap"
    v1 = OnePass(repo / "tiny" / "1")
    x = np.random.default_rng(5).normal(size=(6, 3)).astype(np.float32)
    proc = ServeProcess(repo, tmp_path / "serve.log", snapshot_dir=snap, reap_interval_s=0.1)
    proc.start()
    try:
        with Client(proc.target, timeout=10) as c:
            assert c.predict("tiny", "old", x[:3], seq=0).version == "1"
        assert proc.terminate() == 0
        v2 = OnePass(add_version(repo, "2"))
        (repo / "tiny" / POLICY_FILE).write_text("[version_policy]\nlatest = 1\n")
        proc.start()
        with Client(proc.target, timeout=10) as c:
            r = c.predict("tiny", "old", x[3:], seq=3)
            assert r.version == "1"
            np.testing.assert_allclose(r.y, v1.run(x)[0][3:], atol=ATOL)
            r = c.predict("tiny", "new", x)
            assert r.version == "2"
            np.testing.assert_allclose(r.y, v2.run(x)[0], atol=ATOL)
            assert c.get_model("tiny").version == "2"
            c.end_session("tiny", "old")
            deadline = time.monotonic() + 20
            while (snap / "tiny-1.npz").exists():  # freed by the reaper with its last session
                assert time.monotonic() < deadline, "version 1 was never freed"
                time.sleep(0.05)
        assert proc.terminate() == 0
        assert "tiny-1.npz" not in {p.name for p in snap.iterdir()}
    finally:
        proc.terminate()
    assert "Traceback" not in proc.log()


def _retries_after_restart(
    c: Client,
    xs: dict[tuple[str, str], np.ndarray],
    outputs: dict[tuple[str, str], list[np.ndarray]],
    a_prev: int,
    a: int,
) -> None:
    """The snapshot keeps each session's last answer: a retry of the last request answered
    before the restart gets that answer again; an older one is refused; neither is applied."""
    last = c.predict("tinytok", "t0", tokens=xs[("tinytok", "t0")][a_prev:a].tolist(), seq=a_prev)
    assert last.replayed and last.next_seq == a
    np.testing.assert_array_equal(last.y, outputs[("tinytok", "t0")][-1])
    k = max(range(a_prev, a, 4))  # the stream's last chunk
    chunk = c.predict("tiny", "r0", xs[("tiny", "r0")][k:a], seq=k)
    assert chunk.replayed and chunk.next_seq == a
    np.testing.assert_array_equal(chunk.y, outputs[("tiny", "r0")][-1])
    with pytest.raises(grpc.RpcError) as err:
        c.predict("tiny", "r0", xs[("tiny", "r0")][k - 4 : k], seq=k - 4)
    assert err.value.code() is grpc.StatusCode.FAILED_PRECONDITION
    assert f"expected seq {a}" in (err.value.details() or "")


def test_sigkill_keeps_exactly_the_last_periodic_snapshot(
    tiny_repo: Path, tmp_path: Path, oracles: dict[str, OnePass]
) -> None:
    snap = tmp_path / "snap"
    path = snap / "tiny-1.npz"
    rng = np.random.default_rng(12)
    sids = [f"k{i}" for i in range(6)]
    xs = {sid: rng.normal(size=(24, 3)).astype(np.float32) for sid in sids}
    proc = ServeProcess(
        tiny_repo, tmp_path / "serve.log", snapshot_dir=snap, snapshot_interval_s=0.5
    )
    proc.start()
    try:
        with Client(proc.target, timeout=10) as c:
            for a, b in ((0, 5), (5, 10)):
                c.step(step_request("tiny", [session_steps(s, xs[s][a:b], seq=a) for s in sids]))
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:  # a periodic snapshot with all 10 steps
                if path.exists() and read_snapshot(path) == dict.fromkeys(sids, 10):
                    break
                time.sleep(0.02)
            else:
                pytest.fail("no periodic snapshot within 10 s")
            # Right after a snapshot: one more frame (all sessions, all or nothing), then SIGKILL.
            c.step(step_request("tiny", [session_steps(s, xs[s][10:16], seq=10) for s in sids]))
        assert proc.kill() != 0
        survived = read_snapshot(path)  # what the last snapshot before the kill held
        assert set(survived) == set(sids)
        assert len(set(survived.values())) == 1 and next(iter(survived.values())) in (10, 16)
        kept = survived[sids[0]]
        proc.start()
        with Client(proc.target, timeout=10) as c:
            for sid in sids:
                st = c.get_session("tiny", sid)
                assert st.exists and st.next_seq == kept, (sid, st, kept)
                # The client resends from there: outputs equal one pass.
                rest = c.predict("tiny", sid, xs[sid][kept:], seq=kept)
                np.testing.assert_allclose(
                    rest.y, oracles["tiny"].run(xs[sid])[0][kept:], atol=ATOL
                )
                assert rest.next_seq == 24
        print(f"\nSIGKILL: {kept} of 16 steps survived per session (last snapshot)")
    finally:
        proc.terminate()


def _meta(tiny_repo: Path, **change: object) -> dict[str, object]:
    """The meta a server writes into tiny's snapshot (LoadedModel.snapshot_meta), changed."""
    mv = load_repository(tiny_repo).get("tiny")
    lm = LoadedModel(mv, scheduler=cast(Any, None), label="tiny")  # snapshot_meta reads mv only
    return {**lm.snapshot_meta, **change}


def _snapshot(keys: list[str], n: int, layers: int = 2, hidden: int = 16) -> Captured:
    return Captured(
        keys,
        np.ones((n, layers, hidden), np.float32),
        np.ones((n, layers, hidden), np.float32),
        np.zeros((n, 3), np.float32),
        np.arange(5, 5 + n),
        np.zeros(n),
    )


def test_corrupt_or_foreign_snapshot_does_not_stop_the_server(
    tiny_repo: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    snap = tmp_path / "snap"
    snap.mkdir()
    (snap / "tiny-1.npz").write_bytes(np.random.default_rng(0).bytes(5000))  # not an npz at all
    # A well-formed snapshot of another model (other hidden size and sha256).
    write_snapshot(
        snap / "tinytok-1.npz",
        _snapshot(["ghost"], 1, hidden=32),
        _meta(tiny_repo, name="tinytok", hidden_size=32, sha256="0" * 64),
    )
    caplog.set_level(logging.INFO)
    with ServerThread(model_repository=tiny_repo, snapshot_dir=snap, metrics_port=-1) as srv:
        assert health_status(srv.target) == "SERVING"
        assert all(len(lm.store) == 0 for lm in srv.engine.models.values())
        with Client(srv.target) as c:
            assert not c.get_session("tinytok", "ghost").exists
            assert c.predict("tiny", "fresh", np.ones((2, 3))).next_seq == 2
    not_restored = [r for r in caplog.records if "not restored" in r.getMessage()]
    assert {r.getMessage().split(":")[0] for r in not_restored} == {"tiny", "tinytok"}
    assert read_snapshot(snap / "tiny-1.npz") == {"fresh": 2}  # the stop wrote a good one


def test_inconsistent_snapshot_restores_nothing(tiny_repo: Path, tmp_path: Path) -> None:
    snap = tmp_path / "snap"
    snap.mkdir()
    # Right model, but three keys and state for only two sessions.
    write_snapshot(snap / "tiny-1.npz", _snapshot(["a", "b", "c"], 2), _meta(tiny_repo))
    with ServerThread(model_repository=tiny_repo, snapshot_dir=snap, metrics_port=-1) as srv:
        assert len(srv.engine.model("tiny").store) == 0


@pytest.mark.parametrize(
    "damage",
    ["huge_seq", "negative_seq", "nan_state", "inf_output", "negative_idle", "huge_idle",
     "empty_id", "control_char_id", "long_id", "replay_ahead", "replay_nan"],
)  # fmt: skip
def test_snapshot_with_bad_values_is_moved_aside(
    tiny_repo: Path, tmp_path: Path, damage: str
) -> None:
    """Right shapes, wrong values: the file is kept aside as .bad-*, the server starts empty
    and serves (a next_seq of 2**63-1 once killed the inference worker)."""
    snap = tmp_path / "snap"
    snap.mkdir()
    s = _snapshot(["a", "b"], 2)
    keys = list(s.keys)
    h, y, seq, idle = s.h.copy(), s.last_y.copy(), s.next_seq.copy(), s.idle.copy()
    if damage == "huge_seq":
        seq[1] = 2**63 - 1
    elif damage == "negative_seq":
        seq[0] = -3
    elif damage == "nan_state":
        h[0, 0, 0] = np.nan
    elif damage == "inf_output":
        y[1, 0] = np.inf
    elif damage == "negative_idle":
        idle[0] = -5.0
    elif damage == "huge_idle":
        idle[0] = 1e300
    elif damage == "empty_id":
        keys[0] = ""
    elif damage == "control_char_id":
        keys[0] = "a\x00b"
    elif damage == "long_id":
        keys[0] = "x" * 257
    # seqs are 5 and 6: a last answer of 2 steps from seq 3 (ahead: from seq 5) for "a".
    start = 5 if damage == "replay_ahead" else 3
    ry = np.ones((2, 3), np.float32)
    if damage == "replay_nan":
        ry[1, 1] = np.nan
    replay = CapturedReplay(
        np.array([0]), np.array([start]), np.array([start + 2]), np.array([False]),
        np.array([7], np.uint64), np.array([2]), ry,
    )  # fmt: skip
    write_snapshot(
        snap / "tiny-1.npz", Captured(keys, h, s.c, y, seq, idle, replay), _meta(tiny_repo)
    )
    with ServerThread(model_repository=tiny_repo, snapshot_dir=snap, metrics_port=-1) as srv:
        assert len(srv.engine.model("tiny").store) == 0
        assert len(list(snap.glob("tiny-1.npz.bad-*"))) == 1
        with Client(srv.target) as c:
            assert c.predict("tiny", "b", np.ones((1, 3)), seq=0).next_seq == 1


def test_snapshot_with_principal_keys_restores(tiny_repo: Path, tmp_path: Path) -> None:
    snap = tmp_path / "snap"
    snap.mkdir()
    write_snapshot(snap / "tiny-1.npz", _snapshot(["alice\x1fs1", "s2"], 2), _meta(tiny_repo))
    with ServerThread(model_repository=tiny_repo, snapshot_dir=snap, metrics_port=-1) as srv:
        assert len(srv.engine.model("tiny").store) == 2


def test_snapshots_are_replaced_atomically(tiny_repo: Path, tmp_path: Path) -> None:
    """Periodic snapshots under load: a reader only ever sees whole files; no *.tmp is left."""
    snap = tmp_path / "snap"
    path = snap / "tiny-1.npz"
    stop = threading.Event()
    reads: list[int] = []
    errors: list[BaseException] = []

    def reader() -> None:
        while not stop.is_set():
            if path.exists():
                try:
                    reads.append(len(read_snapshot(path)))
                except Exception as exc:
                    errors.append(exc)
            time.sleep(0.002)

    with ServerThread(
        model_repository=tiny_repo, snapshot_dir=snap, snapshot_interval_s=0.05, metrics_port=-1
    ) as srv:
        t = threading.Thread(target=reader)
        t.start()
        with Client(srv.target) as c:
            for k in range(40):
                frame = [session_steps(f"a{i}", np.ones((1, 3)), seq=k) for i in range(200)]
                c.step(step_request("tiny", frame))
                time.sleep(0.01)
        stop.set()
        t.join()
    assert not errors, errors[:3]
    assert len(reads) > 20 and reads[-1] == 200
    assert sorted(p.name for p in snap.iterdir()) == ["tiny-1.npz", "tinytok-1.npz"]


def test_failed_snapshot_write_keeps_the_old_file_and_leaves_no_tmp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "tiny-1.npz"
    meta: dict[str, object] = {"name": "tiny"}
    write_snapshot(path, _snapshot(["old"], 1), meta)

    def disk_full(f: object, **arrays: object) -> None:
        f.write(b"PK\x03\x04 half a zip")  # type: ignore[attr-defined]
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(np, "savez", disk_full)
    with pytest.raises(OSError):
        write_snapshot(path, _snapshot(["new"], 1), meta)
    monkeypatch.undo()
    assert read_snapshot(path) == {"old": 5}  # the previous snapshot is intact...
    assert [p.name for p in tmp_path.iterdir()] == ["tiny-1.npz"]  # ...and nothing else


def test_two_stops_at_once_are_safe(tiny_repo: Path, tmp_path: Path) -> None:
    snap = tmp_path / "snap"
    srv = ServerThread(model_repository=tiny_repo, snapshot_dir=snap, metrics_port=-1).start()
    with Client(srv.target) as c:
        c.step(step_request("tiny", [session_steps(f"s{i}", np.ones((1, 3))) for i in range(1000)]))

    async def twice() -> list[object]:
        s = srv.server
        return list(await asyncio.gather(s.stop(1.0), s.stop(1.0), return_exceptions=True))

    results = srv.call(twice())
    srv.loop.call_soon_threadsafe(srv.loop.stop)
    assert results == [None, None]
    assert len(read_snapshot(snap / "tiny-1.npz")) == 1000
