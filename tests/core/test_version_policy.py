"""Version policies and labels (core/policy.py, models/<name>/serving.toml): which versions
load, which one new sessions go to, and the canary's share of them; on a real engine over a
copy of the tiny repository, no gRPC. Every answer is compared with one pass of the NumPy
reference over the weights of the version the session started on."""

from __future__ import annotations

import asyncio
import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from lstm_serve.core import frame as F
from lstm_serve.core.engine import Engine
from lstm_serve.core.errors import FailedPrecondition, ServiceError
from lstm_serve.core.policy import (
    BUCKETS,
    POLICY_FILE,
    PolicyError,
    Serving,
    VersionPolicy,
    canary_rows,
    read_policy,
)
from tests.helpers.engine import run_engine, step_tiny
from tests.helpers.models import add_version
from tests.oracle.one_pass import OnePass

ATOL = 1e-5


def xs(seed: int, n: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, 3)).astype(np.float32)


def write_policy(repo: Path, text: str) -> None:
    (repo / "tiny" / POLICY_FILE).write_text(text)


# -- the file ------------------------------------------------------------------------------------


def test_policies_select_versions() -> None:
    found = ["10", "2", "1", "3"]
    assert VersionPolicy().select(found) == ["1", "2", "3", "10"]
    assert VersionPolicy(latest=2).select(found) == ["3", "10"]
    assert VersionPolicy(latest=9).select(found) == ["1", "2", "3", "10"]
    assert VersionPolicy(specific=[1, 10, 7]).select(found) == ["1", "10"]


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("[version_policy]\nlatest = 0\n", "version_policy.latest"),
        ("[version_policy]\nlatest = 1\nspecific = [1]\n", "not both"),
        ("[labels]\ncanary = 2\n", "needs a stable version"),
        ("[labels]\nstable = 1\ncanary_share = 0.5\n", "needs a canary version"),
        ("[labels]\nstable = 1\ncanary = 1\n", "same version"),
        ("[labels]\nstable = 1\ncanary = 2\ncanary_share = 1.5\n", "canary_share"),
        ("[labels]\nstabel = 1\n", "labels.stabel"),
        ("[labels\n", "not TOML"),
    ],
)
def test_a_bad_serving_file_is_refused_saying_where_and_why(
    tmp_path: Path, text: str, why: str
) -> None:
    (tmp_path / POLICY_FILE).write_text(text)
    with pytest.raises(PolicyError, match=why) as err:
        read_policy(tmp_path)
    assert str(tmp_path / POLICY_FILE) in str(err.value)


def test_no_file_is_every_version_and_the_newest(tmp_path: Path) -> None:
    assert read_policy(tmp_path) == Serving()


def test_labels_must_name_versions_the_policy_loads() -> None:
    s = Serving.model_validate(
        {"version_policy": {"latest": 1}, "labels": {"stable": 1, "canary": 2}}
    )
    assert s.check(["2"]) == [
        "label stable names version 1, which the version policy does not load (it loads 2)"
    ]


def test_the_canary_takes_its_share_of_session_ids_and_always_the_same_ones() -> None:
    keys = [f"device-{i}" for i in range(20_000)]
    rows = np.arange(len(keys))
    chosen = canary_rows(keys, rows, 0.1)
    assert abs(chosen.mean() - 0.1) < 0.01  # crc32 spreads ids evenly
    np.testing.assert_array_equal(chosen, canary_rows(keys, rows, 0.1))
    assert not canary_rows(keys, rows, 0.0).any() and canary_rows(keys, rows, 1.0).all()
    assert BUCKETS == 10_000  # shares are honoured to 0.01 %


# -- on the engine -------------------------------------------------------------------------------


def test_latest_one_loads_only_the_newest_at_start(tiny_repo_copy: Path) -> None:
    repo = tiny_repo_copy
    add_version(repo, "2")
    write_policy(repo, "[version_policy]\nlatest = 1\n")

    async def body(engine: Engine) -> None:
        assert sorted(k for k in engine.models if k[0] == "tiny") == [("tiny", "2")]
        assert ("tinytok", "1") in engine.models  # a model without the file: every version

    run_engine(body, repo)


def test_stable_and_canary_split_new_sessions_and_keep_each_on_its_version(
    tiny_repo_copy: Path,
) -> None:
    repo = tiny_repo_copy
    v1, v2 = OnePass(repo / "tiny" / "1"), OnePass(add_version(repo, "2"))
    write_policy(repo, "[labels]\nstable = 1\ncanary = 2\ncanary_share = 0.5\n")
    ids = [f"s{i}" for i in range(40)]
    to_canary = canary_rows(ids, np.arange(40), 0.5)
    assert 5 < to_canary.sum() < 35

    async def body(engine: Engine) -> None:
        assert engine.get_model("tiny").manifest.version == "1"  # stable, though 2 is newer
        x = xs(1, 6)
        fr = F.from_rows(ids, [x[:3]] * 40, np.full(40, F.APPEND), np.zeros(40, bool))
        res = await engine.submit_step("tiny", "", fr)
        assert res.versions == ["2" if c else "1" for c in to_canary]
        for i in range(40):
            ref = (v2 if to_canary[i] else v1).run(x)[0][:3]
            np.testing.assert_allclose(res.y[i], ref, atol=ATOL)
        # each session goes on on its version, one at a time too
        for i in (0, 1, 2, 3):
            r = await step_tiny(engine, ids[i], x[3:])
            assert r.version == ("2" if to_canary[i] else "1")
            np.testing.assert_allclose(
                r.y[0], (v2 if to_canary[i] else v1).run(x)[0][3:], atol=ATOL
            )
        # a reset is a new session: the same id lands on the same side, and nowhere else
        i = int(np.flatnonzero(to_canary)[0])
        r = await step_tiny(engine, ids[i], x[:2], reset=True)
        assert r.version == "2" and int(r.seq[0]) == 0
        await asyncio.sleep(0.05)  # the ends of other copies run on their ticks
        assert engine.models["tiny", "1"].store.slot(ids[i]) is None

    run_engine(body, repo)


def test_applying_the_file_moves_new_sessions_and_drains_what_it_drops(
    tiny_repo_copy: Path,
) -> None:
    repo = tiny_repo_copy
    v1, v2 = OnePass(repo / "tiny" / "1"), OnePass(add_version(repo, "2"))

    async def body(engine: Engine) -> None:
        x = xs(2, 4)
        await step_tiny(engine, "old", x[:2], version="1")
        write_policy(repo, "[labels]\nstable = 1\n")  # roll back: new sessions on 1
        assert await engine.load("tiny", drain_s=3600) == []
        r = await step_tiny(engine, "new", x[:2])
        assert r.version == "1"
        np.testing.assert_allclose(r.y[0], v1.run(x)[0][:2], atol=ATOL)
        write_policy(repo, "[version_policy]\nlatest = 1\n")  # roll forward; 1 drains
        assert await engine.load("tiny", drain_s=3600) == []
        assert engine.models["tiny", "1"].retired_at is not None
        r = await step_tiny(engine, "old", x[2:])  # goes on on 1 during the drain
        assert r.version == "1"
        np.testing.assert_allclose(r.y[0], v1.run(x)[0][2:], atol=ATOL)
        r = await step_tiny(engine, "fresh", x)
        assert r.version == "2"
        np.testing.assert_allclose(r.y[0], v2.run(x)[0], atol=ATOL)
        write_policy(repo, "[labels]\nstable = 7\n")  # a broken file changes nothing
        with pytest.raises(FailedPrecondition, match="stable names version 7"):
            await engine.load("tiny")
        assert engine.versions.policy("tiny").version_policy.latest == 1
        assert engine.models["tiny", "1"].retired_at is not None

    run_engine(body, repo)


def test_polls_follow_the_file_and_pass_over_a_broken_newest_version(
    tiny_repo_copy: Path,
) -> None:
    repo = tiny_repo_copy
    write_policy(repo, "[version_policy]\nlatest = 1\n")

    async def body(engine: Engine) -> None:
        add_version(repo, "2")
        add_version(repo, "3", sha="0" * 64)  # broken: latest 1 falls back on 2
        assert await engine.poll(drain_s=3600) == (["tiny:2"], ["tiny:1"])
        assert engine.get_model("tiny").manifest.version == "2"
        assert await engine.poll(drain_s=3600) == ([], [])
        write_policy(repo, "[labels\n")  # invalid: the last valid one stays
        assert await engine.poll(drain_s=3600) == ([], [])
        write_policy(repo, "[version_policy]\nspecific = [1, 2]\n[labels]\nstable = 1\n")
        assert await engine.poll(drain_s=3600) == (["tiny:1"], [])
        assert engine.get_model("tiny").manifest.version == "1"

    run_engine(body, repo)


def test_a_restart_keeps_sessions_on_a_version_the_policy_no_longer_loads(
    tiny_repo_copy: Path, tmp_path: Path
) -> None:
    repo = tiny_repo_copy
    v1 = OnePass(repo / "tiny" / "1")
    snaps = tmp_path / "snap"
    x = xs(3, 5)

    async def before(engine: Engine) -> None:
        await step_tiny(engine, "old", x[:3])
        add_version(repo, "2")
        write_policy(repo, "[version_policy]\nlatest = 1\n")

    async def after(engine: Engine) -> None:
        lm = engine.models["tiny", "1"]
        assert lm.retired_at is not None  # loaded for its sessions only
        r = await step_tiny(engine, "old", x[3:])
        assert r.version == "1" and int(r.seq[0]) == 3
        np.testing.assert_allclose(r.y[0], v1.run(x)[0][3:], atol=ATOL)
        assert (await step_tiny(engine, "new", x)).version == "2"
        await engine.end_session("tiny", "", "old")
        assert engine.reap_versions() == ["tiny:1"]
        assert not (snaps / "tiny-1.npz").exists()  # a restart must not bring it back

    run_engine(before, repo, snapshot_dir=snaps)
    run_engine(after, repo, snapshot_dir=snaps)
    assert sorted(p.name for p in snaps.iterdir() if p.name.startswith("tiny-")) == ["tiny-2.npz"]


def test_a_changed_version_reloads_once_no_session_is_on_it(tiny_repo_copy: Path) -> None:
    repo = tiny_repo_copy
    v1 = OnePass(repo / "tiny" / "1")

    def change_in_place() -> OnePass:
        """tiny/1's files replaced by other weights under the same version number."""
        other = add_version(repo, "9", scale=0.25)
        manifest = json.loads((other / "manifest.json").read_text())
        manifest["version"] = "1"
        (repo / "tiny" / "1" / "model.onnx").write_bytes((other / "model.onnx").read_bytes())
        (repo / "tiny" / "1" / "manifest.json").write_text(json.dumps(manifest))
        shutil.rmtree(other)
        time.sleep(0.01)  # a later mtime on coarse clocks
        return OnePass(repo / "tiny" / "1")

    async def body(engine: Engine) -> None:
        x = xs(4, 4)
        assert await engine.poll() == ([], [])
        await step_tiny(engine, "s", x[:2])
        new = change_in_place()
        assert await engine.poll() == ([], [])  # s is on it: it serves as loaded
        r = await step_tiny(engine, "s", x[2:])
        np.testing.assert_allclose(r.y[0], v1.run(x)[0][2:], atol=ATOL)
        await engine.end_session("tiny", "", "s")
        assert await engine.poll() == (["tiny:1"], [])  # free now: reloaded
        r = await step_tiny(engine, "t", x)
        np.testing.assert_allclose(r.y[0], new.run(x)[0], atol=ATOL)
        assert await engine.poll() == ([], [])

    run_engine(body, repo)


def test_a_reset_onto_the_canary_moves_the_session_only_once_it_is_applied(
    tiny_repo_copy: Path,
) -> None:
    repo = tiny_repo_copy
    v1, v2 = OnePass(repo / "tiny" / "1"), OnePass(add_version(repo, "2"))
    write_policy(repo, "[labels]\nstable = 1\ncanary = 2\ncanary_share = 1.0\n")

    async def body(engine: Engine) -> None:
        x = xs(6, 5)
        await step_tiny(engine, "s", x[:3], version="1")
        # a reset that is refused (its deadline passed before its turn) moves nothing
        with pytest.raises(ServiceError):
            await engine.submit_step(
                "tiny", "", F.single("s", x[3:4], None, True), deadline=time.monotonic() - 1
            )
        r = await step_tiny(engine, "s", x[3:4])
        assert r.version == "1" and int(r.seq[0]) == 3
        np.testing.assert_allclose(r.y[0], v1.run(x[:4])[0][3:], atol=ATOL)
        # a reset and the next step sent at once: both on 2, one history, nothing on 1 after
        reset = engine.submit_step("tiny", "", F.single("s", x[:2], None, True))
        after = engine.submit_step("tiny", "", F.single("s", x[2:]))
        r1, r2 = await reset, await after
        assert (r1.version, r2.version) == ("2", "2")
        assert int(r2.seq[0]) == 2
        np.testing.assert_allclose(np.concatenate([r1.y[0], r2.y[0]]), v2.run(x)[0], atol=ATOL)
        await asyncio.sleep(0.05)
        assert engine.models["tiny", "1"].store.slot("s") is None
        assert not engine.versions.moving

    run_engine(body, repo)


def test_stateless_rows_go_to_the_default_never_the_canary(tiny_repo_copy: Path) -> None:
    repo = tiny_repo_copy
    add_version(repo, "2")
    write_policy(repo, "[labels]\nstable = 1\ncanary = 2\ncanary_share = 1.0\n")

    async def body(engine: Engine) -> None:
        default = engine.versions.get("tiny")
        keys = ["a", "b", "c"]
        reset = np.array([True, True, False])
        once = np.array([True, False, False])  # reset and ended in its one request
        parts = engine.versions.route(default, keys, reset, once)
        got = {lm.version: rows.tolist() for lm, rows in parts if len(rows)}
        assert got == {"1": [0], "2": [1, 2]}

    run_engine(body, repo)
