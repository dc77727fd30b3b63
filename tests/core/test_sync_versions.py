"""Sessions keep their version across replicas (core/sync.py with several versions, Engine's
_follow): replicas that share one store (a MemoryRemote, Redis's semantics) and serve two
versions of `tiny`, with different defaults. A session one replica started on version 1
continues on version 1 when a request naming no version reaches a replica whose default is 2;
a replica without version 1 refuses it, naming the version; a reset starts it again on the
default. Answers are compared with one pass of the NumPy reference over each version."""

from __future__ import annotations

import asyncio
import shutil
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pytest

from lstm_serve.core import frame as F
from lstm_serve.core.engine import Engine
from lstm_serve.core.errors import Elsewhere, Unavailable
from lstm_serve.core.memory_remote import MemoryRemote, Record
from lstm_serve.core.policy import POLICY_FILE
from lstm_serve.core.probes import Probes, no_probes
from lstm_serve.core.repository import load_repository
from lstm_serve.core.sync import StateSync
from tests.helpers.engine import Settings
from tests.helpers.models import add_version
from tests.oracle.one_pass import OnePass

ATOL = 1e-5


def xs(seed: int, n: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, 3)).astype(np.float32)


def replica_repo(base: Path, dst: Path, policy: str) -> Path:
    """A replica's own copy of the shared repository (the same versions), its serving.toml."""
    shutil.copytree(base, dst)
    (dst / "tiny" / POLICY_FILE).write_text(policy)
    return dst


class Tally:
    """Requests counted by (model label, method, code): the scheduler's and the engine's."""

    def __init__(self) -> None:
        self.counts: Counter[tuple[str, str, str]] = Counter()

    def probes(self, label: str) -> Probes:
        return replace(no_probes(), requests=lambda m, c: _Inc(self.counts, (label, m, c)))

    def count(self, label: str, method: str, code: str) -> None:
        self.counts[(label, method, code)] += 1


@dataclass
class _Inc:
    counts: Counter[tuple[str, str, str]]
    key: tuple[str, str, str]

    def inc(self, amount: float = 1) -> None:
        self.counts[self.key] += int(amount)


async def start(
    repo: Path,
    records: dict[str, Record],
    where: dict[str, tuple[str, float]],
    tally: Tally | None = None,
) -> Engine:
    s = Settings()
    tally = tally or Tally()
    engine = Engine(s, load_repository(repo), tally.probes, tally.count)
    await engine.start()
    for lm in engine.models.values():  # as Engine._share, with a MemoryRemote
        m = lm.mv.manifest
        remote = MemoryRemote(
            m.layers, m.hidden_size, m.output_dim, s.session_ttl_s, s.state_replies,
            namespace=f"{lm.label}:{m.sha256[:12]}", records=records, model=m.name,
            version=m.version, where=where,
        )  # fmt: skip
        StateSync(lm.scheduler, remote, no_probes(), True, s.state_replies, None, 3600.0)
    return engine


def test_a_session_follows_its_version_to_any_replica(tiny_repo_copy: Path, tmp_path: Path) -> None:
    base = tiny_repo_copy
    v1, v2 = OnePass(base / "tiny" / "1"), OnePass(add_version(base, "2"))
    a_repo = replica_repo(base, tmp_path / "a", "[labels]\nstable = 1\n")
    b_repo = replica_repo(base, tmp_path / "b", "")  # the newest, 2
    c_repo = replica_repo(base, tmp_path / "c", "[version_policy]\nlatest = 1\n")  # 2 only
    x = xs(1, 9)

    async def body() -> None:
        records: dict[str, Record] = {}
        where: dict[str, tuple[str, float]] = {}
        tb, tc = Tally(), Tally()
        a = await start(a_repo, records, where)
        b = await start(b_repo, records, where, tb)
        c = await start(c_repo, records, where, tc)
        try:

            async def step(e: Engine, sid: str, rows: slice, reset: bool = False):  # type: ignore[no-untyped-def]
                return await e.submit_step("tiny", "", F.single(sid, x[rows], None, reset))

            r = await step(a, "s", slice(0, 3))  # A's default: 1
            assert r.version == "1"
            np.testing.assert_allclose(r.y[0], v1.run(x)[0][:3], atol=ATOL)
            r = await step(b, "s", slice(3, 5))  # B's default is 2: s goes on on 1
            assert r.version == "1" and int(r.seq[0]) == 3
            np.testing.assert_allclose(r.y[0], v1.run(x)[0][3:5], atol=ATOL)
            # counted once, where it ran: not as a refusal on 2 on the way
            assert tb.counts == {("tiny:1", "Step", "OK"): 1}
            r = await step(b, "s", slice(5, 6))  # now held on B's 1: no refusal on the way
            np.testing.assert_allclose(r.y[0], v1.run(x)[0][5:6], atol=ATOL)
            # a frame of a session on 1 and a new one: each on its own version
            fr = F.from_rows(["s", "n"], [x[6:7], x[6:7]], np.full(2, F.APPEND), np.zeros(2, bool))
            r = await b.submit_step("tiny", "", fr)
            assert r.versions == ["1", "2"]
            np.testing.assert_allclose(r.y[0], v1.run(x)[0][6:7], atol=ATOL)
            np.testing.assert_allclose(r.y[1], v2.run(x[6:7])[0], atol=ATOL)
            # GetSession, Forecast and EndSession find it too (a look at each version's store)
            d = await start(b_repo, records, where)  # a replica that holds nothing yet
            try:
                mv, st = await d.get_session("tiny", "", "s")
                assert mv.manifest.version == "1" and st.exists and st.next_seq == 7
                mv, fc = await d.forecast("tiny", "", "s", 2)
                assert mv.manifest.version == "1"  # row 0: what s's last step predicted
                np.testing.assert_allclose(fc.y[0], v1.run(x[:7])[0][6], atol=ATOL)
                mv, st = await d.get_session("tiny", "", "nobody")
                assert not st.exists
                await d.submit_step("tiny", "", F.single("gone", x[:1]))
                mv, st = await b.end_session("tiny", "", "gone")
                assert mv.manifest.version == "2"
            finally:
                await d.drain(10)
                await d.close()
            # C has no version 1: it refuses, naming it, and changes nothing
            with pytest.raises(Elsewhere, match="is on version 1 of the model, not on 2"):
                await step(c, "s", slice(7, 8))
            assert tc.counts == {("tiny:2", "Step", "FAILED_PRECONDITION"): 1}
            # D's forecast claimed s: B's copy is fenced, and a retry (with seq) is applied once
            with pytest.raises(Unavailable, match="retry"):
                await b.submit_step("tiny", "", F.single("s", x[7:8], 7))
            r = await b.submit_step("tiny", "", F.single("s", x[7:8], 7))
            assert int(r.seq[0]) == 7 and r.version == "1"
            np.testing.assert_allclose(r.y[0], v1.run(x)[0][7:8], atol=ATOL)
            # a reset starts it again where it is sent: on C's 2
            r = await step(c, "s", slice(8, 9), reset=True)
            assert r.version == "2" and int(r.seq[0]) == 0
            np.testing.assert_allclose(r.y[0], v2.run(x[8:9])[0], atol=ATOL)
        finally:
            for e in (a, b, c):
                await e.drain(10)
                await e.close()

    asyncio.run(body())
