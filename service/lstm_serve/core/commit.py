"""Committing a tick: write what succeeded to the store and say what each request gets.

commit() takes a built tick (batch.py) and its parts' outputs, writes the new state of every
request whose parts all succeeded (one vectorised write per part), removes the sessions created
for requests that failed, keeps one replay entry per tick (or per request when rows were
replayed or mixed), ends the sessions that asked to end, and advances the roll-outs. It
resolves no future and counts nothing: the outcome says what the scheduler must do.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from lstm_serve.core import plan as P
from lstm_serve.core.batch import Tick
from lstm_serve.core.jobs import Outputs, StepJob, StepResult
from lstm_serve.core.replay import ReplayCache
from lstm_serve.core.rollout import Rollout
from lstm_serve.core.store import SessionStore

# The replayed column of every applied one-session answer (read-only: shared).
NOT_REPLAYED1 = np.zeros(1, bool)
NOT_REPLAYED1.flags.writeable = False


@dataclass(slots=True)
class Outcome:
    answered: list[tuple[StepJob, StepResult]] = field(default_factory=list)
    failed: list[StepJob] = field(default_factory=list)  # a part of theirs failed to run
    failed_rollouts: list[Rollout] = field(default_factory=list)
    steps_run: int = 0  # session-steps the model ran


def commit(
    store: SessionStore,
    cache: ReplayCache,
    tick: Tick,
    results: list[Outputs | BaseException],
    now: float,
) -> Outcome:
    out = Outcome()
    plan, jobs = tick.plan, tick.jobs
    n = len(tick.keys)
    owner = tick.owner
    ok = tick.ok
    # A job fails whole when any of its parts failed: nothing of it is committed.
    row_part = np.full(n, -1, np.int64)
    row_pos = np.zeros(n, np.int64)
    for pi, (part, res) in enumerate(zip(tick.parts, results, strict=True)):
        k = len(part.rows)
        row_part[part.rows] = pi
        row_pos[part.rows] = np.arange(k)
        if isinstance(res, BaseException):
            if k:
                for j in np.unique(part.rows if owner is None else owner[part.rows]).tolist():
                    j = 0 if owner is None else j
                    if ok[j]:
                        ok[j] = False
                        out.failed.append(jobs[j])
            out.failed_rollouts += part.rollouts
        else:
            out.steps_run += part.x.shape[0] * part.x.shape[1]
    # Sessions created for requests that failed are removed again.
    if len(tick.created):
        failed = ~(np.repeat(ok, n) if owner is None else ok[owner])[tick.created]
        if failed.any():
            store.remove([tick.keys[i] for i in tick.created[failed].tolist()])
    action = plan.action
    runs = plan.runs & (ok if owner is None else ok[owner])
    for part, res in zip(tick.parts, results, strict=True):
        if isinstance(res, BaseException):
            continue
        y, hn, cn = res
        k = len(part.rows)
        if k:
            sel = runs[part.rows]
            rows_ = part.rows if sel.all() else part.rows[sel]
            pos = slice(None, k) if sel.all() else np.flatnonzero(sel)
            if len(rows_):
                t = part.x.shape[1]
                slots = plan.slots[rows_]
                resets = action[rows_] == P.RESET
                if resets.any():
                    store.renew(slots[resets])
                store.commit(slots, hn[:, pos], cn[:, pos], y[pos, -1], plan.base[rows_] + t)
        for i, r in enumerate(part.rollouts):
            r.advance(y[k + i], hn[:, k + i], cn[:, k + i])
    if n and not _answer_all(store, cache, tick, results, runs, now, out):
        for j, job in enumerate(jobs):
            if ok[j]:
                off = int(tick.offsets[j])
                sl = slice(off, off + job.rows)
                result = _answer(store, cache, job, sl, tick, results, row_part, row_pos, now)
                out.answered.append((job, result))
    _end_sessions(store, tick)
    return out


def _end_sessions(store: SessionStore, tick: Tick) -> None:
    """Remove the sessions that requests applied in this tick asked to end."""
    ended: list[str] = []
    for j, job in enumerate(tick.jobs):
        end = job.frame.end
        if end is not None and tick.ok[j] and end.any():
            ended += [job.keys[i] for i in np.flatnonzero(end).tolist()]
    if ended:
        store.remove(ended, ended=True)


def _answer_all(
    store: SessionStore,
    cache: ReplayCache,
    tick: Tick,
    results: list[Outputs | BaseException],
    runs: np.ndarray,
    now: float,
    out: Outcome,
) -> bool:
    """The common case, over the whole tick at once: every row of every request ran, in
    one part, in row order. One replay entry then holds the tick's answers."""
    if len(tick.parts) != 1 or not runs.all() or len(tick.parts[0].rows) != len(runs):
        return False
    res = results[0]
    jobs = tick.jobs
    singles = len(jobs) == len(runs)  # one row per job: uniform by construction
    if isinstance(res, BaseException) or not (singles or all(j.frame.uniform for j in jobs)):
        return False
    n = len(runs)
    y = res[0][:n]
    slots = tick.plan.slots
    base = tick.plan.base
    next_seq = base + y.shape[1]
    store.record(cache, slots, y, base, tick.reset, next_seq, tick.digests)
    store.touch(tick.keys, slots, now)
    if singles:
        # One-row views made in C (list() of a reshape) cost less than four slices a job.
        views = list(base[:, None]), list(next_seq[:, None]), list(y[:, None])
        out.answered = [
            (job, StepResult(job.frame.ids, b, ns, NOT_REPLAYED1, yj))
            for job, b, ns, yj in zip(jobs, *views, strict=True)
        ]
    else:
        replayed = np.zeros(n, bool)
        for job, off in zip(jobs, tick.offsets.tolist(), strict=True):
            end = off + job.rows
            result = StepResult(
                job.frame.ids, base[off:end], next_seq[off:end], replayed[off:end], y[off:end]
            )
            out.answered.append((job, result))
    return True


def _answer(
    store: SessionStore,
    cache: ReplayCache,
    job: StepJob,
    sl: slice,
    tick: Tick,
    results: list[Outputs | BaseException],
    row_part: np.ndarray,
    row_pos: np.ndarray,
    now: float,
) -> StepResult:
    """One request's answer when the tick's rows were mixed: applied rows from their part's
    outputs, replayed rows from the replay entry that answered them first."""
    plan = tick.plan
    action = plan.action[sl]
    n = job.rows
    parts = row_part[sl]
    pos = row_pos[sl]
    applied = (action == P.APPLY) | (action == P.NEW) | (action == P.RESET)
    y: np.ndarray | list[np.ndarray]
    p0 = int(parts[0])
    if applied.all() and (parts == p0).all() and int(pos[-1]) - int(pos[0]) == n - 1:
        res = results[p0]
        assert not isinstance(res, BaseException)
        y = res[0][int(pos[0]) : int(pos[0]) + n]
    else:
        rows_y: list[np.ndarray] = []
        for i in range(n):
            if applied[i]:
                res = results[int(parts[i])]
                assert not isinstance(res, BaseException)
                rows_y.append(res[0][int(pos[i])])
            else:
                f = plan.found[sl.start + i]
                assert f.entry.y is not None
                rows_y.append(f.entry.y[f.row])
        y = np.stack(rows_y) if job.frame.uniform else rows_y
    slots = plan.slots[sl]
    base = plan.base[sl]
    if isinstance(y, np.ndarray):
        steps = np.full(n, y.shape[1], np.int64)
    else:
        steps = np.fromiter((len(a) for a in y), np.int64, n)
    next_seq = base + steps
    replayed = ~applied
    if replayed.any():
        for i in np.flatnonzero(replayed).tolist():
            f = plan.found[sl.start + i]
            next_seq[i] = int(f.entry.next_seq[f.row])
    if applied.any():
        every = bool(applied.all())
        store.record(
            cache, slots, y, base, job.frame.reset, next_seq, tick.digests[sl],
            None if every else applied,
        )  # fmt: skip
        a_slots = slots if every else slots[applied]
        a_keys = job.keys if every else [job.keys[i] for i in np.flatnonzero(applied).tolist()]
        store.touch(a_keys, a_slots, now)
    return StepResult(job.frame.ids, base, next_seq, replayed, y)
