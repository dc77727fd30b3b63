"""Pinned versions across replicas on a real Redis: two in-process replicas serve versions 1
and 2 of `tiny` with different defaults (serving.toml). A session started on version 1 on one
replica continues on version 1 on the other, whose default is 2, with the same history; new
sessions there start on 2. Answers are compared with one pass of the NumPy reference."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from lstm_serve.bench.procs.redis_server import RedisServer
from lstm_serve.client import Client
from lstm_serve.core.policy import POLICY_FILE
from tests.helpers.models import add_version
from tests.helpers.server import ServerThread
from tests.oracle.one_pass import OnePass

ATOL = 1e-5


def test_a_session_keeps_its_version_on_every_replica(
    tiny_repo_copy: Path, tmp_path: Path, redis_server: RedisServer
) -> None:
    base = tiny_repo_copy
    v1, v2 = OnePass(base / "tiny" / "1"), OnePass(add_version(base, "2"))
    repos = []
    for name, policy in (("a", "[labels]\nstable = 1\n"), ("b", "")):
        shutil.copytree(base, tmp_path / name)
        (tmp_path / name / "tiny" / POLICY_FILE).write_text(policy)
        repos.append(tmp_path / name)
    x = np.random.default_rng(3).normal(size=(6, 3)).astype(np.float32)
    a = ServerThread(model_repository=repos[0], state_store=redis_server.url).start()
    b = ServerThread(model_repository=repos[1], state_store=redis_server.url).start()
    try:
        with Client(a.target) as ca, Client(b.target) as cb:
            r = ca.predict("tiny", "s", x[:2])
            assert r.version == "1"
            r = cb.predict("tiny", "s", x[2:4])  # B's default is 2; s lives on 1
            assert r.version == "1" and r.seq == 2
            np.testing.assert_allclose(r.y, v1.run(x)[0][2:4], atol=ATOL)
            # back on A, with seq (A's copy is older than B's writes: seq makes A reload it)
            r = ca.predict("tiny", "s", x[4:], seq=4)
            assert r.version == "1" and r.seq == 4
            np.testing.assert_allclose(r.y, v1.run(x)[0][4:], atol=ATOL)
            r = cb.predict("tiny", "new", x[:2])
            assert r.version == "2"
            np.testing.assert_allclose(r.y, v2.run(x[:2])[0], atol=ATOL)
            r = ca.predict("tiny", "new", x[2:3])  # A's default is 1; new lives on 2
            assert r.version == "2" and r.seq == 2
            np.testing.assert_allclose(r.y, v2.run(x[:3])[0][2:], atol=ATOL)
    finally:
        a.stop()
        b.stop()
