"""The engine: the only API the transport calls (step, forecast, sessions, models, lifecycle).

It runs on the event loop. Per model version it owns a runtime, a state arena, a session table,
a batcher and a replay cache. Requests touching a session are serialised in arrival order
(one writer per session); their state changes only when their inference succeeded.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np

from lstm_serve.core.batcher import Batcher, Work
from lstm_serve.core.errors import (
    DeadlineExceeded,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    SeqGap,
    ServiceError,
    Unavailable,
)
from lstm_serve.core.replay import Replay, ReplayCache
from lstm_serve.core.repository import Kind, ModelVersion, Repository
from lstm_serve.core.runtime import ModelRuntime, choose_device
from lstm_serve.core.state import Arena, CapPolicy, SessionTable
from lstm_serve.server.metrics import Metrics
from lstm_serve.server.settings import Settings

logger = logging.getLogger(__name__)

T = TypeVar("T")
MAX_SESSION_ID = 256


@dataclass(slots=True)
class StepInput:
    session_id: str
    x: np.ndarray | None = None  # real models: flat float32 values (steps * input_dim)
    tokens: np.ndarray | None = None  # token models: int64 ids, one per step
    seq: int | None = None
    reset: bool = False


@dataclass(slots=True)
class StepOutput:
    session_id: str
    seq: int
    next_seq: int
    y: np.ndarray  # [steps, output_dim]
    replayed: bool = False


@dataclass(frozen=True, slots=True)
class SessionStatus:
    session_id: str
    exists: bool
    next_seq: int
    idle_seconds: float


@dataclass(frozen=True, slots=True)
class Sampling:
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0
    seed: int = 0


@dataclass(frozen=True, slots=True)
class ForecastResult:
    session_id: str
    y: np.ndarray  # real models: [horizon, output_dim]; token models: [horizon, vocab] probs
    tokens: np.ndarray  # token models: [horizon] ids; real models: empty
    next_seq: int


@dataclass(eq=False)
class _Ticket:
    """A request's place in the per-session queues; abandoned when its caller went away."""

    abandoned: bool = False
    deadline: float | None = None  # time.monotonic() after which the caller no longer waits

    def check(self) -> None:
        """Refuse to start work whose caller is gone or whose deadline has passed."""
        if self.abandoned:
            raise asyncio.CancelledError()
        if self.deadline is not None and time.monotonic() >= self.deadline:
            raise DeadlineExceeded("the deadline passed before the request could run")


@dataclass(eq=False)
class LoadedModel:
    mv: ModelVersion
    runtime: ModelRuntime
    arena: Arena
    table: SessionTable
    batcher: Batcher
    replay: ReplayCache
    label: str
    x_dtype: type = field(default=np.float32)

    @property
    def snapshot_meta(self) -> dict[str, object]:
        m = self.mv.manifest
        return {
            "name": m.name,
            "version": m.version,
            "layers": m.layers,
            "hidden_size": m.hidden_size,
            "output_dim": m.output_dim,
            "sha256": m.sha256,
        }


def session_key(principal: str, session_id: str) -> str:
    # \x1f cannot appear in a session id (control characters are refused), so keys never collide.
    return f"{principal}\x1f{session_id}" if principal else session_id


def _check_session_id(session_id: str) -> None:
    if not session_id:
        raise InvalidArgument("session_id is empty")
    if len(session_id) > MAX_SESSION_ID:
        raise InvalidArgument(
            f"session_id is {len(session_id)} characters; at most {MAX_SESSION_ID}"
        )
    if not session_id.isprintable():
        raise InvalidArgument("session_id has control characters")


class Engine:
    def __init__(self, settings: Settings, repository: Repository, metrics: Metrics) -> None:
        self.settings = settings
        self.repository = repository
        self.metrics = metrics
        self.models: dict[tuple[str, str], LoadedModel] = {}
        self._accepting = False
        self._inflight = 0
        self._idle = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._snapshot_lock = asyncio.Lock()
        self.device = "cpu"

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        s = self.settings
        choice = choose_device(s.device)
        self.device = choice.device
        loop = asyncio.get_running_loop()
        for mv in self.repository.all():
            m = mv.manifest
            label = f"{m.name}:{m.version}"
            runtime = await asyncio.to_thread(ModelRuntime, mv, choice, s.intra_op_threads)
            await asyncio.to_thread(runtime.warm_up)
            arena = Arena(s.max_sessions, m.layers, m.hidden_size, m.output_dim)
            batcher = Batcher(
                runtime, arena, self.metrics, label, s.max_batch_size, s.max_queue,
                s.max_queue_delay_ms / 1000.0,
            )  # fmt: skip
            lm = LoadedModel(
                mv, runtime, arena, SessionTable(arena), batcher,
                ReplayCache(s.replay_cache_bytes), label,
                np.int64 if m.kind is Kind.token else np.float32,
            )  # fmt: skip
            self._restore(lm)
            batcher.start(loop)
            self.models[mv.key] = lm
            self.metrics.sessions.labels(label).set(len(lm.table))
            self.metrics.sessions_capacity.labels(label).set(s.max_sessions)
            logger.info(
                "model %s loaded (%s, %d layers x %d hidden, %s, %d sessions restored)",
                label, m.kind.value, m.layers, m.hidden_size, runtime.device, len(lm.table),
            )  # fmt: skip
        self._tasks.append(asyncio.create_task(self._reap_forever()))
        if s.snapshot_dir is not None and s.snapshot_interval_s > 0:
            self._tasks.append(asyncio.create_task(self._snapshot_forever()))
        self._accepting = True

    def stop_accepting(self) -> None:
        self._accepting = False
        if self._inflight == 0:
            self._idle.set()

    async def drain(self, timeout: float) -> bool:
        """Wait for in-flight requests; True when all finished in time."""
        self.stop_accepting()
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
            return True
        except TimeoutError:
            logger.warning(
                "drain: %d requests still in flight after %.1fs", self._inflight, timeout
            )
            return False

    async def close(self) -> None:
        """Snapshot (when configured) and stop the inference threads. Call after drain()."""
        self._accepting = False
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        self._tasks.clear()
        await self.snapshot()
        for lm in self.models.values():
            await asyncio.to_thread(lm.batcher.close)

    # -- models ------------------------------------------------------------------------------

    def model(self, name: str, version: str = "") -> LoadedModel:
        mv = self.repository.get(name, version)
        lm = self.models.get(mv.key)
        if lm is None:
            raise NotFound(f"model {name!r} version {mv.manifest.version!r} is not loaded")
        return lm

    def list_models(self) -> list[ModelVersion]:
        return [lm.mv for lm in self.models.values()]

    def get_model(self, name: str, version: str = "") -> ModelVersion:
        return self.model(name, version).mv

    # -- requests ----------------------------------------------------------------------------

    @contextlib.contextmanager
    def _request(self, method: str, model: str, version: str) -> Iterator[LoadedModel]:
        """Admission, in-flight count and the per-request metrics."""
        label = "-"  # never the client's string: unknown names must not mint metric series
        code = "OK"
        t0 = time.perf_counter()
        self._inflight += 1
        try:
            if not self._accepting:
                raise Unavailable("server is draining; retry on another replica or later")
            lm = self.model(model, version)
            label = lm.label
            yield lm
        except ServiceError as exc:
            code = exc.code
            raise
        except asyncio.CancelledError:
            code = "CANCELLED"
            raise
        except Exception:
            code = "INTERNAL"
            raise
        finally:
            self._inflight -= 1
            if self._inflight == 0 and not self._accepting:
                self._idle.set()
            m = self.metrics
            m.requests.labels(label, method, code).inc()
            if method == "Step" and code == "OK":
                m.step_latency.labels(label).observe(time.perf_counter() - t0)

    async def _serialised(
        self,
        lm: LoadedModel,
        keys: Sequence[str],
        fn: Callable[[_Ticket], Awaitable[T]],
        deadline: float | None = None,
    ) -> T:
        """Run fn after every earlier request on these sessions, before every later one.

        Registration is synchronous, so requests queue in arrival order on every session they
        touch at once (no lock-ordering deadlocks, no overtaking). Once started, fn finishes
        even when the caller is cancelled, so a step is either applied and remembered for
        replay, or not applied at all.
        """
        tails = lm.table.tails
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()
        prevs = {id(p): p for k in keys if (p := tails.get(k)) is not None}
        for k in keys:
            tails[k] = done
        ticket = _Ticket(deadline=deadline)

        async def run() -> T:
            try:
                for p in prevs.values():
                    await p  # type: ignore[misc]
                # Checked here, not only by cancellation: the server may learn of an expired
                # deadline only after the requests ahead of this one have finished.
                ticket.check()
                return await fn(ticket)
            finally:
                done.set_result(None)
                for k in keys:
                    if tails.get(k) is done:
                        del tails[k]

        task = asyncio.ensure_future(run())
        task.add_done_callback(_retrieve)
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            ticket.abandoned = True
            raise

    def _decode_steps(self, lm: LoadedModel, inp: StepInput) -> np.ndarray:
        """Validate one session's input; returns x shaped for the batcher."""
        m = lm.mv.manifest
        limit = self.settings.max_steps_per_request
        sid = inp.session_id
        if m.kind is Kind.token:
            if inp.x is not None and inp.x.size:
                raise InvalidArgument(f"session {sid!r}: model {m.name!r} takes tokens, not x")
            t = inp.tokens if inp.tokens is not None else np.empty(0, np.int64)
            if t.size == 0:
                raise InvalidArgument(f"session {sid!r}: no steps (tokens is empty)")
            if t.size > limit:
                raise InvalidArgument(
                    f"session {sid!r}: {t.size} steps; at most {limit} per request"
                )
            bad = np.flatnonzero((t < 0) | (t >= m.output_dim))
            if bad.size:
                raise InvalidArgument(
                    f"session {sid!r}: token id {int(t[bad[0]])} at step {int(bad[0])} "
                    f"is outside the vocabulary [0, {m.output_dim})"
                )
            return t.astype(np.int64, copy=False)
        if inp.tokens is not None and inp.tokens.size:
            raise InvalidArgument(f"session {sid!r}: model {m.name!r} takes x, not tokens")
        x = inp.x if inp.x is not None else np.empty(0, np.float32)
        if x.size == 0:
            raise InvalidArgument(f"session {sid!r}: no steps (x is empty)")
        if x.size % m.input_dim:
            raise InvalidArgument(
                f"session {sid!r}: x has {x.size} values, not a multiple of input_dim {m.input_dim}"
            )
        steps = x.size // m.input_dim
        if steps > limit:
            raise InvalidArgument(f"session {sid!r}: {steps} steps; at most {limit} per request")
        x = x.reshape(steps, m.input_dim)
        # A streamed step has a few values: math.isfinite over them beats two numpy calls.
        if not (
            all(map(math.isfinite, x.ravel().tolist())) if x.size <= 64 else np.isfinite(x).all()
        ):
            finite = np.isfinite(x)
            step = int(np.flatnonzero(~finite.all(axis=1))[0])
            raise InvalidArgument(f"session {sid!r}: x has NaN or Inf at step {step}")
        return x.astype(np.float32, copy=False)

    async def step(
        self,
        model: str,
        version: str,
        inputs: Sequence[StepInput],
        principal: str = "",
        deadline: float | None = None,
    ) -> tuple[ModelVersion, list[StepOutput]]:
        """Run the steps of one request (one session, or many: a gateway frame).

        deadline (time.monotonic()): the request is refused, unapplied, if it has not started by then.
        """
        with self._request("Step", model, version) as lm:
            if not inputs:
                raise InvalidArgument("request has no sessions")
            if len(inputs) > self.settings.max_sessions_per_request:
                raise InvalidArgument(
                    f"request has {len(inputs)} sessions; at most "
                    f"{self.settings.max_sessions_per_request}"
                )
            keys: list[str] = []
            xs: list[np.ndarray] = []
            for inp in inputs:
                _check_session_id(inp.session_id)
                if inp.seq is not None and inp.seq < 0:
                    raise InvalidArgument(f"session {inp.session_id!r}: seq is negative")
                if inp.reset and inp.seq not in (None, 0):
                    raise InvalidArgument(
                        f"session {inp.session_id!r}: a reset starts at seq 0, not {inp.seq}"
                    )
                keys.append(session_key(principal, inp.session_id))
                xs.append(self._decode_steps(lm, inp))
            if len(set(keys)) != len(keys):
                raise InvalidArgument("a session appears twice in one request")

            async def apply(ticket: _Ticket) -> list[StepOutput]:
                return await self._apply_steps(lm, ticket, list(inputs), keys, xs)

            outputs = await self._serialised(lm, keys, apply, deadline)
            return lm.mv, outputs

    async def _apply_steps(
        self,
        lm: LoadedModel,
        ticket: _Ticket,
        inputs: list[StepInput],
        keys: list[str],
        xs: list[np.ndarray],
    ) -> list[StepOutput]:
        table, arena = lm.table, lm.arena
        # 1. Decide every session's fate before changing anything (a frame is all or nothing).
        plan: list[tuple[str, int, int | None, Replay | None]] = []  # (action, seq, slot, replay)
        for inp, key, x in zip(inputs, keys, xs, strict=True):
            slot = table.get(key)
            n = len(x)
            if slot is None:
                if inp.seq not in (None, 0) and not inp.reset:
                    raise NotFound(
                        f"session {inp.session_id!r} not found (never started, ended or "
                        f"expired); start it again with seq 0"
                    )
                plan.append(("new", 0, None, None))
                continue
            next_seq = int(arena.next_seq[slot])
            gen = int(arena.gen[slot])
            if inp.reset:
                r = lm.replay.get(key, gen, 0) if inp.seq == 0 else None
                if r is not None and r.reset and r.steps == n and r.next_seq == next_seq:
                    plan.append(("replay", 0, slot, r))
                else:
                    plan.append(("reset", 0, slot, None))
            elif inp.seq is None or inp.seq == next_seq:
                plan.append(("apply", next_seq, slot, None))
            elif inp.seq > next_seq:
                raise SeqGap(inp.session_id, next_seq, inp.seq)
            else:
                r = lm.replay.get(key, gen, inp.seq)
                if r is None or r.steps != n or r.reset:
                    raise SeqGap(inp.session_id, next_seq, inp.seq)
                plan.append(("replay", inp.seq, slot, r))
        # 2. Room for new sessions.
        n_new = sum(1 for p in plan if p[0] == "new")
        if n_new:
            self._make_room(lm, n_new, set(keys))
        # 3. Create sessions and submit the work.
        created: list[str] = []
        work: list[Work | None] = []
        for (action, seq, slot, _), key, x in zip(plan, keys, xs, strict=True):
            if action == "replay":
                work.append(None)
                continue
            if action == "new":
                slot = table.create(key)
                assert slot is not None  # _make_room made room
                created.append(key)
            assert slot is not None
            w = Work(x=x, slot=slot, commit=True, new_seq=seq + len(x))
            if action == "reset":
                zeros = np.zeros((lm.mv.manifest.layers, lm.mv.manifest.hidden_size), np.float32)
                w.h0, w.c0 = zeros, zeros
            work.append(w)
        todo = [w for w in work if w is not None]
        try:
            if todo:
                await lm.batcher.submit(todo)
        except BaseException:
            for key in created:
                table.remove(key)
            raise
        finally:
            if created:
                self.metrics.sessions.labels(lm.label).set(len(table))
        # 4. Answer, and remember the answers for retries.
        outputs = []
        for (action, seq, _, r), inp, key, done in zip(plan, inputs, keys, work, strict=True):
            if r is not None:
                outputs.append(StepOutput(inp.session_id, seq, r.next_seq, r.y, replayed=True))
                continue
            assert done is not None and done.y is not None
            table.touch(done.slot)
            slot_gen = arena.gen[done.slot]
            gen = arena.new_generation(done.slot) if action == "reset" else int(slot_gen)
            lm.replay.put(
                key, gen, seq, Replay(len(done.x), action == "reset", done.y, done.new_seq)
            )
            outputs.append(StepOutput(inp.session_id, seq, done.new_seq, done.y))
        return outputs

    def _make_room(self, lm: LoadedModel, n_new: int, protect: set[str]) -> None:
        free = lm.arena.capacity - lm.arena.used
        if n_new <= free:
            return
        cap = lm.arena.capacity
        if self.settings.cap_policy is CapPolicy.refuse:
            raise ResourceExhausted(
                f"model {lm.label} holds its maximum of {cap} sessions; end idle sessions or retry later"
            )
        for _ in range(n_new - free):
            victim = lm.table.lru(protect)
            if victim is None:
                raise ResourceExhausted(
                    f"model {lm.label} holds {cap} sessions, all busy; retry later"
                )
            lm.table.remove(victim)
            self.metrics.sessions_evicted.labels(lm.label, "lru").inc()
        self.metrics.sessions.labels(lm.label).set(len(lm.table))

    # -- forecast ----------------------------------------------------------------------------

    async def forecast(
        self,
        model: str,
        version: str,
        session_id: str,
        horizon: int,
        prefix: StepInput | None = None,
        sampling: Sampling | None = None,
        commit: bool = False,
        principal: str = "",
    ) -> tuple[ModelVersion, ForecastResult]:
        """Roll a session forward, feeding predictions back as inputs."""
        sampling = sampling or Sampling()
        with self._request("Forecast", model, version) as lm:
            _check_session_id(session_id)
            m = lm.mv.manifest
            if not 1 <= horizon <= self.settings.max_forecast_horizon:
                raise InvalidArgument(
                    f"horizon {horizon} is outside [1, {self.settings.max_forecast_horizon}]"
                )
            if m.kind is Kind.real and m.output_dim != m.input_dim:
                raise InvalidArgument(
                    f"model {m.name!r} predicts {m.output_dim} values from {m.input_dim}: "
                    f"its predictions cannot be fed back"
                )
            if sampling.temperature < 0 or not np.isfinite(sampling.temperature):
                raise InvalidArgument("temperature must be a finite number >= 0")
            px = None
            if prefix is not None:
                prefix.session_id = session_id
                px = self._decode_steps(lm, prefix)
            key = session_key(principal, session_id)

            async def run(ticket: _Ticket) -> ForecastResult:
                return await self._forecast(
                    lm, key, session_id, horizon, px, prefix, sampling, commit
                )

            return lm.mv, await self._serialised(lm, [key], run)

    async def _forecast(
        self,
        lm: LoadedModel,
        key: str,
        session_id: str,
        horizon: int,
        px: np.ndarray | None,
        prefix: StepInput | None,
        sampling: Sampling,
        commit: bool,
    ) -> ForecastResult:
        m = lm.mv.manifest
        arena, table = lm.arena, lm.table
        slot = table.get(key)
        zeros = np.zeros((m.layers, m.hidden_size), np.float32)
        if slot is None:
            if px is None:
                raise NotFound(f"session {session_id!r} not found; send a prefix to start it")
            h, c, next_seq = zeros, zeros, 0
            last_y = None
        else:
            reset = prefix is not None and prefix.reset
            with arena.lock:
                h = zeros if reset else arena.h[slot].copy()
                c = zeros if reset else arena.c[slot].copy()
                next_seq = 0 if reset else int(arena.next_seq[slot])
                last_y = None if next_seq == 0 else arena.last_y[slot].copy()
        if px is not None:
            assert prefix is not None
            if prefix.seq is not None and prefix.seq != next_seq:
                raise SeqGap(session_id, next_seq, prefix.seq)
            w = await self._run_one(lm, px, h, c)
            assert w.y is not None and w.hn is not None and w.cn is not None
            h, c, last_y = w.hn, w.cn, w.y[-1]
            next_seq += len(px)
        if last_y is None:
            raise InvalidArgument(f"session {session_id!r} has no steps yet; send a prefix")
        rng = np.random.default_rng(sampling.seed if sampling.seed else None)
        preds = np.empty((horizon, m.output_dim), np.float32)
        tokens = np.empty(horizon if m.kind is Kind.token else 0, np.int64)
        for k in range(horizon):
            preds[k] = last_y
            if m.kind is Kind.token:
                tokens[k] = _choose_token(last_y, sampling, rng)
                x = tokens[k : k + 1]
            else:
                x = last_y.reshape(1, m.input_dim)
            if k == horizon - 1 and not commit:
                break  # the last prediction needs no further step
            w = await self._run_one(lm, x, h, c)
            assert w.y is not None and w.hn is not None and w.cn is not None
            h, c, last_y = w.hn, w.cn, w.y[-1]
        if commit:
            next_seq += horizon
            if slot is None:
                self._make_room(lm, 1, {key})
                slot = table.create(key)
                assert slot is not None
                self.metrics.sessions.labels(lm.label).set(len(table))
            elif prefix is not None and prefix.reset:
                arena.new_generation(slot)
            with arena.lock:
                arena.h[slot], arena.c[slot], arena.last_y[slot] = h, c, last_y
                arena.next_seq[slot] = next_seq
            table.touch(slot)
        elif slot is not None:
            next_seq = int(arena.next_seq[slot])
        else:
            next_seq = 0
        return ForecastResult(session_id, preds, tokens, next_seq)

    async def _run_one(self, lm: LoadedModel, x: np.ndarray, h: np.ndarray, c: np.ndarray) -> Work:
        w = Work(x=x, h0=h, c0=c)
        await lm.batcher.submit([w])
        return w

    # -- session management ------------------------------------------------------------------

    def get_session(
        self, model: str, version: str, session_id: str, principal: str = ""
    ) -> tuple[ModelVersion, SessionStatus]:
        with self._request("GetSession", model, version) as lm:
            _check_session_id(session_id)
            return lm.mv, self._status(lm, session_key(principal, session_id), session_id)

    def _status(self, lm: LoadedModel, key: str, session_id: str) -> SessionStatus:
        slot = lm.table.get(key)
        if slot is None:
            return SessionStatus(session_id, False, 0, 0.0)
        idle = time.monotonic() - float(lm.arena.last_used[slot])
        return SessionStatus(session_id, True, int(lm.arena.next_seq[slot]), max(idle, 0.0))

    async def reset_session(
        self, model: str, version: str, session_id: str, principal: str = ""
    ) -> tuple[ModelVersion, SessionStatus]:
        with self._request("ResetSession", model, version) as lm:
            _check_session_id(session_id)
            key = session_key(principal, session_id)

            async def run(ticket: _Ticket) -> SessionStatus:
                slot = lm.table.get(key)
                if slot is None:
                    raise NotFound(f"session {session_id!r} not found")
                with lm.arena.lock:
                    lm.arena.clear(slot)
                return self._status(lm, key, session_id)

            return lm.mv, await self._serialised(lm, [key], run)

    async def end_session(
        self, model: str, version: str, session_id: str, principal: str = ""
    ) -> tuple[ModelVersion, SessionStatus]:
        with self._request("EndSession", model, version) as lm:
            _check_session_id(session_id)
            key = session_key(principal, session_id)

            async def run(ticket: _Ticket) -> SessionStatus:
                status = self._status(lm, key, session_id)
                if not status.exists:
                    raise NotFound(f"session {session_id!r} not found")
                lm.table.remove(key)
                self.metrics.sessions.labels(lm.label).set(len(lm.table))
                return SessionStatus(session_id, False, status.next_seq, status.idle_seconds)

            return lm.mv, await self._serialised(lm, [key], run)

    # -- background work ---------------------------------------------------------------------

    def reap(self, now: float | None = None) -> int:
        """Expire idle sessions (never one with a request queued or running)."""
        total = 0
        for lm in self.models.values():
            expired = lm.table.expired(self.settings.session_ttl_s, now)
            for key in expired:
                lm.table.remove(key)
            if expired:
                self.metrics.sessions_evicted.labels(lm.label, "ttl").inc(len(expired))
                self.metrics.sessions.labels(lm.label).set(len(lm.table))
                logger.info("%s: %d idle sessions expired", lm.label, len(expired))
            total += len(expired)
        return total

    async def _reap_forever(self) -> None:
        while True:
            await asyncio.sleep(self.settings.reap_interval_s)
            try:
                self.reap()
            except Exception:
                logger.exception("session reaper failed")

    async def _snapshot_forever(self) -> None:
        while True:
            await asyncio.sleep(self.settings.snapshot_interval_s)
            try:
                await self.snapshot()
            except Exception:
                logger.exception("periodic snapshot failed")

    async def snapshot(self) -> int:
        """Write every model's sessions to snapshot_dir; returns the sessions written."""
        directory = self.settings.snapshot_dir
        if directory is None:
            return 0
        directory.mkdir(parents=True, exist_ok=True)
        total = 0
        async with self._snapshot_lock:  # one writer per file: periodic and final never overlap
            for lm in self.models.values():
                snap = lm.table.capture()
                path = directory / f"{lm.mv.manifest.name}-{lm.mv.manifest.version}.npz"
                await asyncio.to_thread(snap.write, path, lm.snapshot_meta)
                total += len(snap.keys)
                logger.info(
                    "%s: snapshot of %d sessions written to %s", lm.label, len(snap.keys), path
                )
        return total

    def _restore(self, lm: LoadedModel) -> None:
        directory = self.settings.snapshot_dir
        if directory is None:
            return
        path = directory / f"{lm.mv.manifest.name}-{lm.mv.manifest.version}.npz"
        if not path.exists():
            return
        try:
            lm.table.restore(path, lm.snapshot_meta)
        except Exception:
            # Serve with no sessions rather than not at all, and move the file aside so the
            # next snapshot does not overwrite what an operator may want to inspect.
            kept = path.with_name(f"{path.name}.bad-{int(time.time())}")
            path.replace(kept)
            logger.exception("%s: snapshot %s not restored (kept as %s)", lm.label, path, kept)


def _choose_token(probs: np.ndarray, sampling: Sampling, rng: np.random.Generator) -> int:
    if sampling.temperature == 0:
        return int(np.argmax(probs))
    logits = np.log(np.clip(probs.astype(np.float64), 1e-30, None)) / sampling.temperature
    if 0 < sampling.top_k < logits.size:
        cut = np.partition(logits, -sampling.top_k)[-sampling.top_k]
        logits = np.where(logits >= cut, logits, -np.inf)
    p = np.exp(logits - logits.max())
    p /= p.sum()
    return int(rng.choice(p.size, p=p))


def _retrieve(task: asyncio.Task[object]) -> None:
    """Mark a shielded task's exception as seen when its caller went away."""
    if not task.cancelled():
        task.exception()
