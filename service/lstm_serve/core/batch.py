"""Building a tick's batch, and running it: no futures, no counting.

build() plans every row of a tick's requests over arrays (plan.py), makes room for new
sessions, and gathers each part's inputs and state: rows grouped by step count, step rows first
and roll-out rows after. run_parts() runs the parts through the model (inline or in the
executor) and returns each part's outputs or the exception it raised.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from lstm_serve.core import plan as P
from lstm_serve.core.errors import FailedPrecondition, SeqGap, ServiceError, SessionNotFound
from lstm_serve.core.frame import digest
from lstm_serve.core.jobs import Outputs, Runner, StepJob
from lstm_serve.core.probes import Probes
from lstm_serve.core.rollout import Rollout
from lstm_serve.core.store import CapPolicy, SessionStore

logger = logging.getLogger(__name__)


@dataclass(eq=False, slots=True)
class Part:
    """Rows of one tick that share a step count: the step rows first, then roll-out rows."""

    x: np.ndarray
    h: Any  # [layers, batch, hidden], where the state lives (numpy or cupy)
    c: Any
    rows: np.ndarray  # global step-row indices of the first len(rows) batch rows
    rollouts: list[Rollout]


@dataclass(eq=False, slots=True)
class Tick:
    jobs: list[StepJob]
    offsets: np.ndarray  # first global row of each job
    plan: P.Plan
    ok: np.ndarray  # bool [jobs]: planned without error (commit clears the ones that fail)
    keys: list[str]
    digests: np.ndarray
    created: np.ndarray  # rows whose session this tick created
    parts: list[Part]
    owner: np.ndarray | None  # int64 [rows]: the job of each row (None: one job)
    reset: np.ndarray  # bool [rows]
    failures: list[tuple[int, ServiceError]]  # (job, why) for requests refused while planning
    evicted: int  # sessions evicted (LRU) to make room


def build(
    store: SessionStore,
    jobs: list[StepJob],
    rollouts: list[Rollout],
    taken: set[str],
    cap_policy: CapPolicy,
    label: str,
) -> Tick:
    """Plan a tick's requests over arrays, make room for new sessions, and gather each part's
    inputs and state. Requests that cannot run are in tick.failures (nothing of them runs or
    is committed); taken: sessions that LRU eviction must spare."""
    n_jobs = len(jobs)
    if n_jobs == 0:  # roll-outs only
        keys, blocks = [], []
        seq, reset = np.empty(0, np.int64), np.empty(0, bool)
        offsets = np.empty(0, np.int64)
    elif n_jobs == 1:
        f = jobs[0].frame
        keys = jobs[0].keys
        seq, reset = f.seq, f.reset
        blocks = [(b.rows, b.x) for b in f.blocks]
        offsets = np.zeros(1, np.int64)
    else:
        seq = np.concatenate([j.frame.seq for j in jobs])
        reset = np.concatenate([j.frame.reset for j in jobs])
        counts = np.fromiter((j.rows for j in jobs), np.int64, n_jobs)
        if len(seq) == n_jobs:  # streamed sessions: one row (and one block) per job
            keys = [j.keys[0] for j in jobs]
            offsets = np.arange(n_jobs, dtype=np.int64)
            xs = [j.frame.blocks[0].x for j in jobs]
            t0 = xs[0].shape[1]
            if all(x.shape[1] == t0 for x in xs):
                blocks = [(offsets, np.concatenate(xs))]
            else:
                blocks = [(offsets[i : i + 1], x) for i, x in enumerate(xs)]
        else:
            keys = [k for j in jobs for k in j.keys]
            offsets = np.zeros(n_jobs, np.int64)
            np.cumsum(counts[:-1], out=offsets[1:])
            blocks = [(b.rows + off, b.x) for j, off in zip(jobs, offsets.tolist(), strict=True) for b in j.frame.blocks]  # fmt: skip
    n = len(keys)
    steps = np.empty(n, np.int64)
    digests = np.empty(n, np.uint64)
    # Step rows grouped by step count: one digest per group (a row's digest is its own),
    # and each group is one part's input below.
    by_t: dict[int, list[tuple[np.ndarray, np.ndarray]]] = {}
    for rows_, x in blocks:
        by_t.setdefault(x.shape[1], []).append((rows_, x))
    groups: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    for t, group in by_t.items():
        if len(group) == 1:
            rows_, x = group[0]
        else:
            rows_ = np.concatenate([g[0] for g in group])
            x = np.concatenate([g[1] for g in group])
        steps[rows_] = t
        digests[rows_] = digest(x)
        groups[t] = (rows_, x)
    slots = store.lookup(keys)
    plan = P.plan_rows(store, slots, seq, reset, steps, digests)
    owner = None
    if n_jobs > 1:
        owner = offsets if n == n_jobs else np.repeat(np.arange(n_jobs), counts)
    ok = np.ones(n_jobs, bool)
    failures: list[tuple[int, ServiceError]] = []
    n_evicted = 0
    action = plan.action
    bad = (action == P.GAP) | (action == P.NOT_FOUND) | (action == P.MISMATCH)
    if bad.any():
        for i in np.flatnonzero(bad).tolist():
            j = 0 if owner is None else int(owner[i])
            if ok[j]:
                ok[j] = False
                failures.append((j, row_error(plan, jobs[j], i - int(offsets[j]), i)))
    # Room for new sessions, request by request in arrival order.
    new = action == P.NEW
    created: list[np.ndarray] = []
    if new.any():
        new_rows = np.flatnonzero(new)
        per_job = (
            np.array([len(new_rows)])
            if owner is None
            else np.bincount(owner[new_rows], minlength=n_jobs)
        )
        for j in np.flatnonzero(per_job).tolist():
            if not ok[j]:
                continue
            try:
                evicted = store.make_room(int(per_job[j]), cap_policy, taken, label)
            except ServiceError as exc:
                ok[j] = False
                failures.append((j, exc))
                continue
            n_evicted += len(evicted)
            mine = new_rows if owner is None else new_rows[owner[new_rows] == j]
            new_keys = [keys[i] for i in mine.tolist()]
            plan.slots[mine] = store.create(new_keys)
            created.append(mine)
    runs = plan.runs
    if not ok.all():
        runs &= ok if owner is None else ok[owner]
    # Parts: step rows grouped by step count, then the roll-outs' rows.
    empty = np.empty(0, np.int64)
    for r in rollouts:
        assert r.pending_x is not None
        groups.setdefault(r.pending_x.shape[1], (empty, r.pending_x[:0]))
    parts: list[Part] = []
    zero = action == P.RESET
    xp = store.arrays.xp
    for t, (rows_, x) in groups.items():
        xs, hs, cs = [], [], []
        if len(rows_):
            sel = runs[rows_]
            if not sel.all():
                rows_, x = rows_[sel], x[sel]
            h, c = store.gather(plan.slots[rows_])
            z = zero[rows_]
            if z.any():
                zi = store.arrays.index(np.flatnonzero(z))
                h[:, zi] = 0.0
                c[:, zi] = 0.0
            xs, hs, cs = [x], [h], [c]
        rs = [r for r in rollouts if r.pending_x is not None and r.pending_x.shape[1] == t]
        if rs:
            xs += [r.pending_x for r in rs if r.pending_x is not None]
            hs.append(xp.stack([r.h for r in rs], axis=1))
            cs.append(xp.stack([r.c for r in rs], axis=1))
        if not xs or sum(len(a) for a in xs) == 0:
            continue
        if len(xs) == 1:
            parts.append(Part(xs[0], hs[0], cs[0], rows_, rs))
        else:
            parts.append(
                Part(
                    np.concatenate(xs),
                    xp.concatenate(hs, axis=1),
                    xp.concatenate(cs, axis=1),
                    rows_,
                    rs,
                )
            )
    created_rows = np.concatenate(created) if created else np.empty(0, np.int64)
    return Tick(
        jobs, offsets, plan, ok, keys, digests, created_rows, parts, owner, reset, failures,
        n_evicted,
    )  # fmt: skip


def run_parts(
    runtime: Runner,
    parts: list[Part],
    max_batch: int,
    probes: Probes,
    label: str,
    xp: Any = np,
) -> list[Outputs | BaseException]:
    """Run every part (in the executor or inline): outputs, or the exception it raised.
    xp: the array module of the parts' state (numpy, or cupy when it lives on the GPU)."""
    out: list[Outputs | BaseException] = []
    mb = max_batch
    for p in parts:
        t0 = time.perf_counter()
        b = p.x.shape[0]
        try:
            if b <= mb:
                res = runtime.run(p.x, xp.ascontiguousarray(p.h), xp.ascontiguousarray(p.c))
            else:
                chunks = [
                    runtime.run(
                        p.x[i : i + mb],
                        xp.ascontiguousarray(p.h[:, i : i + mb]),
                        xp.ascontiguousarray(p.c[:, i : i + mb]),
                    )
                    for i in range(0, b, mb)
                ]
                res = (
                    np.concatenate([ch[0] for ch in chunks]),
                    xp.concatenate([ch[1] for ch in chunks], axis=1),
                    xp.concatenate([ch[2] for ch in chunks], axis=1),
                )
            out.append(res)
        except Exception as exc:
            logger.exception("%s: inference failed for a batch of %d rows", label, b)
            out.append(exc)
        finally:
            probes.inference_seconds.observe(time.perf_counter() - t0)
            probes.batch_size.observe(b)
    return out


def row_error(plan: P.Plan, job: StepJob, i: int, g: int) -> ServiceError:
    """The error of row i of job (row g of the tick)."""
    sid = job.frame.ids[i]
    a = int(plan.action[g])
    if a == P.NOT_FOUND:
        return SessionNotFound(sid)
    if a == P.MISMATCH:
        return FailedPrecondition(
            f"session {sid!r}: seq {int(job.frame.seq[i])} was already applied with "
            f"different inputs (other values or another number of steps); a retry must "
            f"resend the same steps; expected seq {int(plan.expected[g])}"
        )
    return SeqGap(sid, int(plan.expected[g]), int(job.frame.seq[i]))
