"""Model versions loaded and unloaded while serving (core/versions.py, Engine.load/unload), on a
real engine over a copy of the tiny repository, no gRPC.

Version 2 of `tiny` is made by copying version 1 with other weights (scaled), so that which
version answered shows in the outputs; every answer is compared with one pass of the NumPy
reference over that version's weights.
"""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import numpy as np
import pytest

from lstm_serve.core import frame as F
from lstm_serve.core.engine import Engine
from lstm_serve.core.errors import FailedPrecondition, NotFound
from lstm_serve.core.jobs import StepResult
from tests.helpers.engine import run_engine, step_tiny
from tests.helpers.models import add_version, make_model_repo
from tests.oracle.one_pass import OnePass

ATOL = 1e-5


def xs(seed: int, n: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, 3)).astype(np.float32)


def y_of(res: StepResult) -> np.ndarray:
    return np.asarray(res.y[0])


def test_a_version_added_while_serving_takes_new_sessions_and_old_ones_stay(
    tiny_repo_copy: Path,
) -> None:
    repo = tiny_repo_copy
    v1 = OnePass(repo / "tiny" / "1")

    async def body(engine: Engine) -> None:
        x = xs(1, 6)
        await step_tiny(engine, "old", x[:3])
        v2dir = add_version(repo, "2")
        v2 = OnePass(v2dir)
        assert await engine.load("tiny") == ["2"]
        assert engine.get_model("tiny").manifest.version == "2"
        res = await step_tiny(engine, "old", x[3:])  # names no version: stays on 1
        np.testing.assert_allclose(y_of(res), v1.run(x)[0][3:], atol=ATOL)
        assert int(res.seq[0]) == 3
        res = await step_tiny(engine, "new", x)  # a new session: the default, 2
        np.testing.assert_allclose(y_of(res), v2.run(x)[0], atol=ATOL)
        assert engine.models["tiny", "1"].store.slot("new") is None
        assert engine.models["tiny", "2"].store.slot("old") is None
        # GetSession and a forecast-free op follow the session too
        _, st = await engine.get_session("tiny", "", "old")
        assert st.exists and st.next_seq == 6
        # a frame of sessions on both versions is split, and every row answered in order
        z = xs(2, 2)
        fr = F.from_rows(
            ["new", "old", "fresh"], [z, z, z], np.full(3, F.APPEND), np.zeros(3, bool)
        )
        res = await engine.submit_step("tiny", "", fr)
        assert res.ids == ["new", "old", "fresh"]
        assert res.seq.tolist() == [6, 6, 0] and res.next_seq.tolist() == [8, 8, 2]
        np.testing.assert_allclose(res.y[0], v2.run(np.concatenate([x, z]))[0][6:], atol=ATOL)
        np.testing.assert_allclose(res.y[1], v1.run(np.concatenate([x, z]))[0][6:], atol=ATOL)
        np.testing.assert_allclose(res.y[2], v2.run(z)[0], atol=ATOL)
        # naming the version still reaches it
        res = await step_tiny(engine, "pinned", z, version="1")
        np.testing.assert_allclose(y_of(res), v1.run(z)[0], atol=ATOL)

    run_engine(body, repo)


def test_unloading_drains_then_refuses_and_a_reset_moves_the_session(tiny_repo_copy: Path) -> None:
    repo = tiny_repo_copy
    add_version(repo, "2")

    async def body(engine: Engine) -> None:
        x = xs(3, 4)
        await step_tiny(engine, "s", x[:2], version="1")
        assert engine.unload("tiny", "1", drain_s=3600) == ["1"]
        assert engine.get_model("tiny").manifest.version == "2"
        with pytest.raises(FailedPrecondition, match="'1' is being unloaded and starts no new"):
            await step_tiny(engine, "other", x, version="1")
        res = await step_tiny(engine, "s", x[2:3])  # goes on until the deadline
        assert int(res.next_seq[0]) == 3
        engine.models["tiny", "1"].drain_deadline = 0.0  # the deadline passed
        with pytest.raises(FailedPrecondition, match="'1' was unloaded; send the session's next"):
            await step_tiny(engine, "s", x[3:])
        assert (
            int(
                engine.models["tiny", "1"].store.next_seq[
                    engine.models["tiny", "1"].store.slot("s")
                ]
            )
            == 3
        )
        res = await step_tiny(engine, "s", x[3:], reset=True)  # starts again on 2
        assert int(res.seq[0]) == 0 and engine.models["tiny", "2"].store.slot("s") is not None
        for _ in range(50):  # the copy on 1 ends; then 1 is freed
            await asyncio.sleep(0.01)
            if engine.reap_versions():
                break
        assert ("tiny", "1") not in engine.models
        assert [
            mv.manifest.version for mv in engine.list_models() if mv.manifest.name == "tiny"
        ] == ["2"]

    run_engine(body, repo)


def test_a_broken_version_is_refused_with_its_reason_and_serving_goes_on(
    tiny_repo_copy: Path,
) -> None:
    repo = tiny_repo_copy

    async def body(engine: Engine) -> None:
        await step_tiny(engine, "a", xs(4, 2))
        add_version(repo, "2", sha="0" * 64)
        with pytest.raises(FailedPrecondition, match="sha256"):
            await engine.load("tiny", "2")
        assert ("tiny", "2") not in engine.models
        assert engine.get_model("tiny").manifest.version == "1"
        res = await step_tiny(engine, "a", xs(5, 1))
        assert int(res.seq[0]) == 2
        with pytest.raises(NotFound):
            await engine.load("nope")
        with pytest.raises(NotFound):
            await engine.load("tiny", "9")
        with pytest.raises(NotFound):
            engine.unload("tiny", "9")

    run_engine(body, repo)


def test_unloading_every_version_then_loading_again(tiny_repo_copy: Path) -> None:
    async def body(engine: Engine) -> None:
        await step_tiny(engine, "a", xs(6, 2))
        engine.unload("tiny", drain_s=3600)
        with pytest.raises(NotFound, match="no version serving new sessions"):
            await step_tiny(engine, "b", xs(6, 1))
        assert await engine.load("tiny", "1") == ["1"]  # taken back, its sessions kept
        res = await step_tiny(engine, "a", xs(7, 1))
        assert int(res.seq[0]) == 2

    run_engine(body, tiny_repo_copy)


def test_polling_loads_new_versions_and_unloads_removed_ones(tiny_repo_copy: Path) -> None:
    repo = tiny_repo_copy

    async def body(engine: Engine) -> None:
        assert await engine.poll() == ([], [])
        add_version(repo, "2")
        add_version(repo, "3", sha="0" * 64)  # broken: refused, and not retried until changed
        assert await engine.poll() == (["tiny:2"], [])
        assert await engine.poll() == ([], [])
        assert engine.get_model("tiny").manifest.version == "2"
        shutil.rmtree(repo / "tiny" / "2")
        assert await engine.poll(drain_s=0) == ([], ["tiny:2"])
        assert engine.get_model("tiny").manifest.version == "1"
        assert ("tiny", "2") not in engine.models  # it held no session: freed at once
        with pytest.raises(NotFound):
            await engine.load("tiny", "../tiny/1")

    run_engine(body, repo)


def test_two_loads_at_once_load_a_version_once(tiny_repo_copy: Path) -> None:
    async def body(engine: Engine) -> None:
        add_version(tiny_repo_copy, "2")
        first, second = await asyncio.gather(engine.load("tiny", "2"), engine.load("tiny", "2"))
        assert sorted([first, second]) == [[], ["2"]]
        lm = engine.models["tiny", "2"]
        res = await step_tiny(engine, "n", xs(8, 2))
        assert engine.models["tiny", "2"] is lm and lm.store.slot("n") is not None
        assert int(res.seq[0]) == 0

    run_engine(body, tiny_repo_copy)


def test_a_request_over_versions_with_other_output_sizes_is_refused_unapplied(
    tiny_repo_copy: Path,
) -> None:
    async def body(engine: Engine) -> None:
        x = xs(9, 2)
        await step_tiny(engine, "old", x[:1])
        make_model_repo(tiny_repo_copy, version="2", output_dim=5, seed=3)  # needs torch
        assert await engine.load("tiny", "2") == ["2"]
        fr = F.from_rows(["old", "new"], [x[1:], x[1:]], np.full(2, F.APPEND), np.zeros(2, bool))
        with pytest.raises(FailedPrecondition, match="different output sizes"):
            await engine.submit_step("tiny", "", fr)
        assert int(engine.models["tiny", "1"].store.next_seq[
            engine.models["tiny", "1"].store.slot("old")
        ]) == 1  # fmt: skip
        assert engine.models["tiny", "2"].store.slot("new") is None
        res = await step_tiny(engine, "new", x)  # alone, each goes on
        assert np.asarray(res.y[0]).shape == (2, 5)

    run_engine(body, tiny_repo_copy)
