"""The engine: what the transport calls. It holds one scheduler per model version, checks
requests before they queue, and runs the lifecycle (restore, reaper, snapshots, drain, close).

Nothing here writes session state once requests are admitted: every change goes through a
scheduler's tick. The one write of its own is restoring a snapshot into an empty store at
start, before the model serves.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from lstm_serve.core import frame as F
from lstm_serve.core.errors import (
    Elsewhere,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ServiceError,
    Unavailable,
)
from lstm_serve.core.jobs import Limits, SessionStatus, StepResult
from lstm_serve.core.policy import (
    POLICY_FILE,
    PolicyError,
    Serving,
    policy_mtime,
    read_policy,
    resolve,
)
from lstm_serve.core.probes import Probes
from lstm_serve.core.remote import StoreDown
from lstm_serve.core.replay import ReplayCache
from lstm_serve.core.repository import (
    Kind,
    LoadError,
    Manifest,
    ModelVersion,
    Repository,
    is_model_name,
    is_version,
    load_version,
    model_dirs,
    version_dirs,
)
from lstm_serve.core.rollout import ForecastResult, Rollout, Sampling
from lstm_serve.core.runtime import Device, ModelRuntime, choose_device
from lstm_serve.core.scheduler import Scheduler
from lstm_serve.core.snapshot import read_snapshot, write_snapshot
from lstm_serve.core.store import CapPolicy, SessionStore
from lstm_serve.core.sync import AnswerMode, StateSync, StoreHealth
from lstm_serve.core.versions import LoadedModel, Versions, check_retired

logger = logging.getLogger(__name__)

# A frame, or how to decode one once the model is known (the transport's decoder).
FrameSource = F.Frame | Callable[[Manifest], F.Frame]


class EngineSettings(Protocol):
    """The settings the engine reads (server/settings.py's Settings has them all)."""

    @property
    def device(self) -> Device: ...
    @property
    def intra_op_threads(self) -> int: ...
    @property
    def max_batch_size(self) -> int: ...
    @property
    def max_queue(self) -> int: ...
    @property
    def inline_max_steps(self) -> int: ...
    @property
    def cuda_cpu_max_steps(self) -> int: ...
    @property
    def state_on_device(self) -> bool: ...
    @property
    def inference_stall_s(self) -> float: ...
    @property
    def max_batches_in_flight(self) -> int: ...
    @property
    def max_steps_per_request(self) -> int: ...
    @property
    def max_sessions_per_request(self) -> int: ...
    @property
    def max_sessions(self) -> int: ...
    @property
    def cap_policy(self) -> CapPolicy: ...
    @property
    def session_ttl_s(self) -> float: ...
    @property
    def unload_drain_s(self) -> float: ...
    @property
    def reap_interval_s(self) -> float: ...
    @property
    def replay_cache_bytes(self) -> int: ...
    @property
    def max_forecast_horizon(self) -> int: ...
    @property
    def snapshot_dir(self) -> Path | None: ...
    @property
    def snapshot_interval_s(self) -> float: ...
    @property
    def state_store(self) -> str: ...
    @property
    def state_answer(self) -> AnswerMode: ...
    @property
    def state_store_timeout_s(self) -> float: ...
    @property
    def state_replies(self) -> int: ...


def session_key(principal: str, session_id: str) -> str:
    return f"{principal}{F.KEY_SEP}{session_id}" if principal else session_id


class Engine:
    def __init__(
        self,
        settings: EngineSettings,
        repository: Repository,
        probes: Callable[[str], Probes],
        requests: Callable[[str, str, str], None] | None = None,
    ) -> None:
        self.settings = settings
        self.repository = repository
        self._probes = probes
        # (model label or "-", method, code): counts requests refused before they queue.
        self._count = requests or (lambda label, method, code: None)
        # The loaded versions; repository keeps those that serve new sessions.
        self.versions = Versions(repository)
        # poll(): manifests' mtimes of versions refused (retried once changed) and loaded
        self._poll_failed: dict[tuple[str, str], float] = {}
        self._poll_mtime: dict[tuple[str, str], float] = {}
        self._reload_due: set[tuple[str, str]] = set()  # changed on disk, to reload when free
        # One load, poll or reload at a time: each awaits (checks, warm-up) between looking at
        # what is loaded and adding to it.
        self._control = asyncio.Lock()
        # poll(): serving.toml's mtime when it was last found invalid (logged once per change)
        self._policy_failed: dict[str, float | None] = {}
        self._accepting = False
        self._tasks: list[asyncio.Task[None]] = []
        self._snapshot_lock = asyncio.Lock()
        self.device = "cpu"
        # Called with (model name, reason) when a model's inference worker dies or stalls.
        self.on_model_failed: Callable[[str, str], None] | None = None
        # Called after versions were loaded, unloaded or freed (the server's health follows).
        self.on_versions_changed: Callable[[], None] | None = None
        # Called with (model name, reason) for each version refused at load: its checks or
        # its warm-up run failed (at start, by poll or on request).
        self.on_load_failed: Callable[[str, str], None] | None = None
        self._redis: Any = None
        # With a shared store: whether it accepts this replica (set by _share); its on_change
        # is called with the reason while the store refuses this replica, None once it accepts.
        self.store_health: StoreHealth | None = None

    # -- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        s = self.settings
        choice = choose_device(s.device)
        self.device = choice.device
        if s.state_store != "memory":
            await self._connect_store()
        limits = Limits(
            s.max_batch_size, s.max_queue, s.inline_max_steps, s.cap_policy, s.inference_stall_s,
            s.max_batches_in_flight,
        )  # fmt: skip
        self._choice, self._limits = choice, limits
        for mv, serves in self._select_at_start():
            m = mv.manifest
            try:  # the warm-up run: a graph that passed the checks may still fail to run
                lm = await self._load_one(mv)
            except Exception as exc:
                logger.exception(
                    "model %s:%s not loaded: its warm-up run failed", m.name, m.version
                )
                self.repository.errors.append(
                    LoadError(
                        mv.onnx_path, "warm-up", f"the warm-up run failed ({type(exc).__name__})"
                    )
                )
                self._load_failed(m.name, "warm-up run failed")
                continue
            self.versions.add(lm)
            if not serves:
                self.versions.retire(lm, s.unload_drain_s)
                logger.info(
                    "model %s: not in its version policy, loaded only for the %d sessions its "
                    "snapshot holds; they may go on for %.0fs", lm.label, len(lm.store),
                    s.unload_drain_s,
                )  # fmt: skip
        if not self.versions.loaded:
            raise RuntimeError("no model version could be loaded: every warm-up run failed")
        self._tasks.append(asyncio.create_task(self._reap_forever()))
        shared = s.state_store != "memory"
        if s.snapshot_dir is not None and s.snapshot_interval_s > 0 and not shared:
            self._tasks.append(asyncio.create_task(self._snapshot_forever()))
        self._accepting = True

    def _select_at_start(self) -> list[tuple[ModelVersion, bool]]:
        """The versions to load at start, and whether each serves new sessions: those each
        model's serving.toml selects, and (not serving) others whose snapshot holds sessions,
        so that a restart keeps every session on its version. A model whose serving.toml is
        invalid is not loaded."""
        root = self.repository.root
        out: list[tuple[ModelVersion, bool]] = []
        for name in sorted(self.repository.models):
            found = self.repository.models.pop(name)  # versions.add puts back what loads
            try:
                serving, selected = resolve(root / name, list(found))
            except PolicyError as exc:
                logger.error("model %s not loaded: %s", name, exc)
                self.repository.errors.append(LoadError(root / name, POLICY_FILE, str(exc)))
                self._load_failed(name, str(exc))
                continue
            self.versions.set_policy(name, serving)
            for v in sorted(found, key=int):
                path = self._snapshot_path(found[v].manifest)
                if v in selected:
                    out.append((found[v], True))
                elif self.settings.state_store == "memory" and path is not None and path.exists():
                    out.append((found[v], False))
        return out

    async def _load_one(self, mv: ModelVersion, restore: bool = True) -> LoadedModel:
        """A version's runtime (warmed up), store and scheduler; its sessions restored (unless
        restore is False: a reload, whose snapshot is of the other weights)."""
        s = self.settings
        m = mv.manifest
        label = f"{m.name}:{m.version}"
        runtime = await asyncio.to_thread(
            ModelRuntime, mv, self._choice, s.intra_op_threads, s.cuda_cpu_max_steps,
            s.state_on_device,
        )  # fmt: skip
        await asyncio.to_thread(runtime.warm_up)
        store = SessionStore(s.max_sessions, m.layers, m.hidden_size, m.output_dim, runtime.arrays)
        probes = self._probes(label)
        sched = Scheduler(
            runtime, store, ReplayCache(s.replay_cache_bytes), probes, self._limits, label
        )
        sched.version = m.version
        lm = LoadedModel(mv, sched, label)
        sched.on_broken = lambda reason, name=m.name: self._model_failed(name, reason)
        if s.state_store == "memory":
            if restore:
                self._restore(lm)
        else:  # the shared store holds the sessions: replicas start empty
            self._share(lm, probes)
        probes.sessions.set(len(store))
        probes.capacity.set(s.max_sessions)
        logger.info(
            "model %s loaded (%s, %d layers x %d hidden, %s, state in %s memory, %d sessions "
            "restored)",
            label, m.kind.value, m.layers, m.hidden_size, runtime.device,
            "GPU" if runtime.arrays.where == "cuda" else "host", len(store),
        )  # fmt: skip
        return lm

    def _load_failed(self, name: str, reason: str) -> None:
        if self.on_load_failed is not None:
            self.on_load_failed(name, reason)

    def _model_failed(self, name: str, reason: str) -> None:
        if self.on_model_failed is not None:
            self.on_model_failed(name, reason)

    def _share(self, lm: LoadedModel, probes: Probes) -> None:
        from lstm_serve.core.redis_store import RedisRemote

        s = self.settings
        m = lm.mv.manifest
        # The weights' hash is part of the namespace: other weights never read this state.
        space = f"{lm.label}:{m.sha256[:12]}"
        remote = RedisRemote(
            self._redis, space, m.layers, m.hidden_size, m.output_dim, s.session_ttl_s,
            s.state_replies, m.name, m.version,
        )  # fmt: skip
        acked = s.state_answer is AnswerMode.acked
        StateSync(
            lm.scheduler, remote, probes, acked, s.state_replies, self.store_health,
            s.session_ttl_s,
        )  # fmt: skip

    async def _connect_store(self) -> None:
        """Connect to the shared store, and fail fast when it is unreachable or refuses this
        replica (a wrong password, TLS settings): serving would only answer UNAVAILABLE."""
        from lstm_serve.core.redis_store import check, connect, redact

        s = self.settings
        self._redis = client = connect(s.state_store, s.state_store_timeout_s)
        self.store_health = StoreHealth(lambda: check(client))
        try:
            await self.store_health.check()
        except StoreDown as exc:
            await client.aclose()
            why = "refuses this replica" if exc.refused else "is not reachable"
            raise RuntimeError(f"session store {redact(s.state_store)} {why}: {exc}") from None

    def stop_accepting(self) -> None:
        self._accepting = False

    @property
    def accepting(self) -> bool:
        """Started and not draining."""
        return self._accepting

    @property
    def ready(self) -> bool:
        """Accepting, and no model's inference worker has died or stalled."""
        return (
            self._accepting
            and all(lm.scheduler.broken is None for lm in self.models.values())
            and (self.store_health is None or self.store_health.refused is None)
        )

    def model_ready(self, name: str, version: str = "") -> bool:
        """The model is loaded, the engine accepting, and its inference worker alive."""
        try:
            lm = self.model(name, version)
        except ServiceError:
            return False
        refused = self.store_health is not None and self.store_health.refused is not None
        serving = lm.retired_at is None  # a version being unloaded takes no new sessions
        return self._accepting and lm.scheduler.broken is None and not refused and serving

    @property
    def idle(self) -> bool:
        return all(
            lm.scheduler.idle and (lm.sync is None or lm.sync.idle) for lm in self.models.values()
        )

    async def drain(self, timeout: float) -> bool:
        """Stop accepting, then wait for queued and running work; True when all finished."""
        self.stop_accepting()
        deadline = time.monotonic() + timeout
        while not self.idle:
            if time.monotonic() >= deadline:
                logger.warning("drain: work still queued after %.1fs", timeout)
                return False
            await asyncio.sleep(0.002)
        return True

    async def close(self) -> None:
        """Snapshot (when configured) and stop the inference threads. Call after drain()."""
        self._accepting = False
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        self._tasks.clear()
        if self.settings.state_store == "memory":
            await self.snapshot()
        for lm in self.models.values():
            if lm.sync is not None:  # the drain's last writes
                await lm.sync.close()
            await asyncio.to_thread(lm.scheduler.close)
        if self.store_health is not None:
            await self.store_health.close()

    # -- models --------------------------------------------------------------------------------

    @property
    def models(self) -> dict[tuple[str, str], LoadedModel]:
        """Every loaded version, those being unloaded included."""
        return self.versions.loaded

    def model(self, name: str, version: str = "") -> LoadedModel:
        """A loaded version, or (version "") the default version of name."""
        return self.versions.get(name, version)

    def list_models(self) -> list[ModelVersion]:
        return [lm.mv for lm in self.models.values()]

    def get_model(self, name: str, version: str = "") -> ModelVersion:
        return self.model(name, version).mv

    def _admit(self, method: str, name: str, version: str) -> LoadedModel:
        try:
            if not self._accepting:
                raise Unavailable("server is draining; retry on another replica or later")
            return self.model(name, version)
        except ServiceError as exc:
            self._count(self._label_of(name, version), method, exc.code)
            raise

    def _label_of(self, name: str, version: str) -> str:
        """A loaded model's label, else "-": unknown names must not mint metric series."""
        try:
            return self.model(name, version).label
        except ServiceError:
            return "-"

    def _refused(self, lm: LoadedModel, method: str, exc: ServiceError) -> None:
        self._count(lm.label, method, exc.code)

    # -- steps ---------------------------------------------------------------------------------

    def check_frame(self, lm: LoadedModel, frame: F.Frame) -> None:
        m = lm.mv.manifest
        s = self.settings
        F.check(
            frame, lm.token, m.input_dim, m.output_dim, s.max_steps_per_request,
            s.max_sessions_per_request,
        )  # fmt: skip

    def _frame(self, lm: LoadedModel, source: FrameSource) -> F.Frame:
        frame = source if isinstance(source, F.Frame) else source(lm.mv.manifest)
        self.check_frame(lm, frame)
        return frame

    def submit_step(
        self,
        name: str,
        version: str,
        source: FrameSource,
        principal: str = "",
        deadline: float | None = None,
    ) -> asyncio.Future[StepResult]:
        """Check and queue one request (one session, or a frame of many); returns its future.

        Synchronous, so requests queue in the order they were read. deadline (time.monotonic()):
        the request is refused, unapplied, if its turn comes after it.
        """
        lm = self._admit("Step", name, version)
        try:
            frame = self._frame(lm, source)
            keys = frame.ids if not principal else [session_key(principal, i) for i in frame.ids]
            if not version and self.versions.others(name):
                return self._submit_routed(lm, source, frame, keys, deadline)
            if lm.retired_at is not None:
                check_retired(lm, self._default_version(name), lm.store.lookup(keys) >= 0,
                              frame.reset)  # fmt: skip
            fut = self._submit(lm, frame, keys, deadline)
            if lm.sync is not None:  # no other version here to follow a session to
                fut.add_done_callback(functools.partial(self._count_elsewhere, lm, "Step"))
            return fut
        except ServiceError as exc:
            self._refused(lm, "Step", exc)
            raise

    def _submit(
        self, lm: LoadedModel, frame: F.Frame, keys: list[str], deadline: float | None
    ) -> asyncio.Future[StepResult]:
        fut = lm.scheduler.submit_step(frame, keys, deadline)
        return fut if lm.sync is None else lm.sync.acked(fut, keys)

    def _pin(self, lm: LoadedModel, name: str, version: str, key: str) -> LoadedModel:
        """The version a call on one session goes to: the one that holds it (versions.py)."""
        if version or not self.versions.others(name):
            return lm
        parts = self.versions.route(lm, [key], np.zeros(1, bool))
        return next(p for p, rows in parts if len(rows))

    async def _locate(
        self, lm: LoadedModel, name: str, version: str, principal: str, session_id: str
    ) -> tuple[LoadedModel, bool]:
        """_pin, and with a shared store a look (no claim) at each version's store for a
        session no version here holds: another replica may have started it on any of them.
        Returns the version, and whether the session was found in its shared store."""
        key = session_key(principal, session_id)
        lm = self._pin(lm, name, version, key)
        others = self.versions.others(name)
        if version or lm.sync is None or not others or lm.store.slot(key) is not None:
            return lm, False
        try:
            F.check_ids([session_id], 1)
        except ServiceError:
            return lm, False  # refused by the caller's checks, without a look at the store
        for cand in (lm, *others):
            if cand.sync is not None and await cand.sync.peek(key) is not None:
                return cand, True
        return lm, False

    def _default_version(self, name: str) -> str:
        return self.versions.default_version(name)

    def _submit_routed(
        self,
        default: LoadedModel,
        source: FrameSource,
        frame: F.Frame,
        keys: list[str],
        deadline: float | None,
    ) -> asyncio.Future[StepResult]:
        """A request naming no version while other versions are loaded: each session goes on
        on the version that holds it (versions.py). Rows on several versions are split into
        one request per version; each is applied or refused on its own (a retry with seq
        replays what was applied), and the answer is the first error or all rows' answers."""
        once = None if frame.end is None else frame.reset & frame.end
        parts = self.versions.route(default, keys, frame.reset, once)
        dv = default.version
        outs = {lm.mv.manifest.output_dim for lm, rows in parts if len(rows)}
        if len(outs) > 1:  # one answer cannot hold outputs of several sizes
            raise FailedPrecondition(
                f"this request's sessions are on versions of model {default.mv.manifest.name!r} "
                f"with different output sizes; send them in separate requests, or name the "
                f"version"
            )
        subs: list[tuple[LoadedModel, np.ndarray, F.Frame]] = []
        for lm, rows in parts:
            if not len(rows):
                continue
            whole = len(rows) == len(keys)
            # Decoded again only for a version whose inputs differ from the default's.
            f = frame if _same_inputs(lm, default) else self._frame(lm, source)
            sub = f if whole else F.take(f, rows)
            if lm.retired_at is not None:
                sk = keys if whole else [keys[i] for i in rows.tolist()]
                check_retired(lm, dv, lm.store.lookup(sk) >= 0, sub.reset)
            subs.append((lm, rows, sub))
        # A reset starts its session on the version chosen for it. Its copies on other
        # versions are ended once the reset is applied (a refused reset leaves them as they
        # were); meanwhile later requests on the session go where the reset went.
        name = default.mv.manifest.name
        moving = self.versions.moving
        ends: list[list[tuple[str, str, LoadedModel]]] = []
        for lm, rows, _ in subs:
            part_ends = []
            if frame.reset.any():
                for i in rows[frame.reset[rows]].tolist():
                    for other in (default, *self.versions.others(name)):
                        if other is not lm and other.store.slot(keys[i]) is not None:
                            part_ends.append((frame.ids[i], keys[i], other))
                            moving[keys[i]] = lm
            ends.append(part_ends)
        futs = []
        try:
            for (lm, rows, sub), part_ends in zip(subs, ends, strict=True):
                sk = keys if len(rows) == len(keys) else [keys[i] for i in rows.tolist()]
                fut = self._submit(lm, sub, sk, deadline)
                if lm.sync is not None:  # the shared store may hold a session elsewhere
                    fut = asyncio.ensure_future(
                        self._follow(lm, fut, source, default, frame, rows, sk, deadline)
                    )
                if part_ends:
                    fut.add_done_callback(functools.partial(self._end_copies, part_ends))
                futs.append(fut)
        except BaseException:
            for part_ends in ends[len(futs) :]:
                for _, key, _ in part_ends:
                    moving.pop(key, None)
            raise
        if len(subs) == 1:
            return futs[0]
        return asyncio.ensure_future(
            _merge(frame.ids, [(lm.version, r) for lm, r, _ in subs], futs)
        )

    def _end_copies(
        self, ends: list[tuple[str, str, LoadedModel]], fut: asyncio.Future[StepResult]
    ) -> None:
        """After a reset onto another version: end the session's copies elsewhere if it was
        applied; then (or at once, if it was refused) its requests route as before."""
        moving = self.versions.moving
        if fut.cancelled() or fut.exception() is not None:
            for _, key, _ in ends:
                moving.pop(key, None)
            return
        for sid, key, other in ends:
            try:
                op = other.scheduler.submit_op("end", sid, key, "EndSession")
            except ServiceError:  # that version is closing: its copy goes with it
                moving.pop(key, None)
                continue
            op.add_done_callback(functools.partial(_moved, moving, key))

    def _count_elsewhere(self, lm: LoadedModel, method: str, fut: asyncio.Future[Any]) -> None:
        """Count a refusal the scheduler left to the engine (Elsewhere), when it is the answer."""
        if not fut.cancelled() and isinstance(exc := fut.exception(), Elsewhere):
            self._count(lm.label, method, exc.code)

    async def _follow(
        self,
        lm: LoadedModel,
        fut: asyncio.Future[StepResult],
        source: FrameSource,
        base: LoadedModel,
        whole: F.Frame,
        rows: np.ndarray,
        keys: list[str],
        deadline: float | None,
    ) -> StepResult:
        """With a shared store: a request (rows of whole, a frame decoded for base) refused,
        unapplied, because the store holds some of its sessions under another version of the
        model (another replica started them there) is sent again with those sessions on their
        version, when this replica has it loaded (otherwise the refusal, which names the
        version, is the answer)."""
        try:
            return await fut
        except Elsewhere as exc:
            name = lm.mv.manifest.name
            targets = {v: self.versions.loaded.get((name, v)) for v in set(exc.moved.values())}
            moved = np.array([exc.moved.get(k, "") for k in keys])
            parts = [(lm, np.flatnonzero(moved == ""))]
            parts += [(t, np.flatnonzero(moved == v)) for v, t in targets.items() if t is not None]
            outs = {t.mv.manifest.output_dim for t, part in parts if len(part)}
            if any(t is None for t in targets.values()) or len(outs) > 1:
                # not here, or one answer cannot hold outputs of several sizes
                self._count(lm.label, "Step", exc.code)
                raise
            futs, answered = [], []
            try:
                for target, part in parts:
                    if not len(part):
                        continue
                    # rows of the whole request, decoded again for a version whose inputs differ
                    f = whole if _same_inputs(target, base) else self._frame(target, source)
                    mine = rows[part]
                    sub = f if len(mine) == len(f) else F.take(f, mine)
                    sk = keys if len(part) == len(keys) else [keys[i] for i in part.tolist()]
                    if target.retired_at is not None and target is not lm:
                        # the store holds them: they are no new sessions there
                        check_retired(target, lm.version, np.ones(len(sk), bool), sub.reset)
                    futs.append(self._submit(target, sub, sk, deadline))
                    answered.append((target.version, part))
                ids = [whole.ids[i] for i in rows.tolist()]
                if len(futs) == 1:
                    return await futs[0]
                return await _merge(ids, answered, futs)
            except Elsewhere as again:  # refused again: this is the answer, counted once
                self._count(lm.label, "Step", again.code)
                raise

    # -- forecast ------------------------------------------------------------------------------

    async def forecast(
        self,
        name: str,
        version: str,
        session_id: str,
        horizon: int,
        prefix: FrameSource | None = None,
        sampling: Sampling | None = None,
        commit: bool = False,
        principal: str = "",
        deadline: float | None = None,
        fits: Callable[[Manifest], None] | None = None,
    ) -> tuple[ModelVersion, ForecastResult]:
        """Roll a session forward, feeding predictions back as inputs. fits(manifest) raises
        when the answer would not reach the client (checked before anything is applied)."""
        sampling = sampling or Sampling()
        lm = self._admit("Forecast", name, version)
        lm, stored = await self._locate(lm, name, version, principal, session_id)
        try:
            m = lm.mv.manifest
            F.check_ids([session_id], 1)
            if lm.retired_at is not None:
                held = stored or lm.store.slot(session_key(principal, session_id)) is not None
                check_retired(lm, self._default_version(name), np.array([held]), np.zeros(1, bool))
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
            if m.kind is Kind.real and (sampling.top_k or sampling.temperature):
                raise InvalidArgument(
                    f"model {m.name!r} is real-valued: top_k and temperature apply to token "
                    f"models only"
                )
            if m.kind is Kind.token and sampling.top_k > m.output_dim:
                raise InvalidArgument(
                    f"top_k {sampling.top_k} is more than model {m.name!r}'s vocabulary of "
                    f"{m.output_dim} tokens"
                )
            if fits is not None:
                fits(m)
            px = None
            if prefix is not None:
                px = prefix if isinstance(prefix, F.Frame) else prefix(m)
                if len(px) != 1:
                    raise InvalidArgument("a forecast's prefix is one session's steps")
                if px.ids[0] not in ("", session_id):
                    raise InvalidArgument(
                        f"prefix.session_id {px.ids[0]!r} is not the forecast's "
                        f"session_id {session_id!r}; leave it empty or repeat it"
                    )
                px.ids[0] = session_id
                self.check_frame(lm, px)
            loop = asyncio.get_running_loop()
            rollout = Rollout(
                session_key(principal, session_id), session_id, horizon, commit, sampling,
                lm.token, px, loop.create_future(), deadline, time.perf_counter(),
            )  # fmt: skip
            fut = lm.scheduler.submit_rollout(rollout)
            if lm.sync is not None:
                fut = lm.sync.acked(fut, [rollout.key])
                fut.add_done_callback(functools.partial(self._count_elsewhere, lm, "Forecast"))
        except ServiceError as exc:
            self._refused(lm, "Forecast", exc)
            raise
        return lm.mv, await fut

    # -- session management --------------------------------------------------------------------

    async def get_session(
        self, name: str, version: str, session_id: str, principal: str = ""
    ) -> tuple[ModelVersion, SessionStatus]:
        lm = self._admit("GetSession", name, version)
        key = session_key(principal, session_id)
        lm, _ = await self._locate(lm, name, version, principal, session_id)
        try:
            F.check_ids([session_id], 1)
            status = lm.scheduler.status(key, session_id)
            sync = lm.sync
            if sync is not None:
                # Another replica may own it: the shared store knows (no claim: a look only).
                n = await sync.peek(key)
                status = SessionStatus(session_id, n is not None, n or 0, 0.0)
        except ServiceError as exc:
            self._refused(lm, "GetSession", exc)
            raise
        self._count(lm.label, "GetSession", "OK")
        return lm.mv, status

    async def _op(
        self, method: str, kind: str, name: str, version: str, session_id: str, principal: str
    ) -> tuple[ModelVersion, SessionStatus]:
        lm = self._admit(method, name, version)
        lm, _ = await self._locate(lm, name, version, principal, session_id)
        try:
            F.check_ids([session_id], 1)
            key = session_key(principal, session_id)
            fut = lm.scheduler.submit_op(kind, session_id, key, method)
            if lm.sync is not None:
                fut = lm.sync.acked(fut, [key])
                fut.add_done_callback(functools.partial(self._count_elsewhere, lm, method))
        except ServiceError as exc:
            self._refused(lm, method, exc)
            raise
        return lm.mv, await fut

    async def reset_session(
        self, name: str, version: str, session_id: str, principal: str = ""
    ) -> tuple[ModelVersion, SessionStatus]:
        return await self._op("ResetSession", "reset", name, version, session_id, principal)

    async def end_session(
        self, name: str, version: str, session_id: str, principal: str = ""
    ) -> tuple[ModelVersion, SessionStatus]:
        return await self._op("EndSession", "end", name, version, session_id, principal)

    # -- versions: loaded and unloaded while serving ------------------------------------------

    async def load(self, name: str, version: str = "", drain_s: float = 300.0) -> list[str]:
        """Load one version of a model from the repository directory now, or (version "")
        apply its serving.toml: load the versions its policy selects, unload (drain_s as
        unload's) loaded ones it does not, and take its labels. Each version is checked as at
        start before it serves; a version being unloaded is taken back into service. Returns
        the versions loaded. Raises NotFound when there is no such directory,
        FailedPrecondition naming the reasons when a version or serving.toml is broken (the
        policy is then not applied, and serving goes on untouched)."""
        async with self._control:
            return await self._load(name, version, drain_s)

    async def _load(self, name: str, version: str, drain_s: float) -> list[str]:
        model_dir = self.repository.root / name
        if not is_model_name(name) or not model_dir.is_dir():
            raise NotFound(f"model {name[:64]!r} not found in the repository")
        if version:
            if not is_version(version) or not (model_dir / version).is_dir():
                raise NotFound(f"model {name!r} has no version {version[:64]!r} in the repository")
            loaded, errors = await self._load_versions(name, [version])
            serving: Serving | None = None
        else:
            try:
                serving, selected = resolve(model_dir, [d.name for d in version_dirs(model_dir)])
            except PolicyError as exc:
                self._load_failed(name, str(exc))
                raise FailedPrecondition(f"model {name!r} not loaded: {exc}") from None
            loaded, errors = await self._load_versions(name, selected)
        if loaded:
            self._versions_changed()
        if errors:
            logger.error("model %s: not loaded: %s", name, "; ".join(errors))
            raise FailedPrecondition(f"model {name!r} not loaded: " + "; ".join(errors)[:1000])
        if serving is not None:
            self._apply_policy(name, serving, selected, drain_s)
        return loaded

    async def _load_versions(self, name: str, versions: list[str]) -> tuple[list[str], list[str]]:
        """Load these versions of name (taking back those being unloaded); returns (the
        versions loaded, the reasons of those refused)."""
        loaded: list[str] = []
        errors: list[str] = []
        for v in versions:
            lm = self.versions.loaded.get((name, v))
            if lm is not None:
                if lm.retired_at is not None:
                    self.versions.unretire(lm)
                    loaded.append(v)
                continue
            d = self.repository.root / name / v
            mv, errs = await asyncio.to_thread(load_version, d, True)
            if mv is None:
                errors += [str(e) for e in errs]
                self._load_failed(name, "; ".join(str(e) for e in errs))
                continue
            try:  # the warm-up run: a graph that loads may still fail to run
                lm = await self._load_one(mv)
            except Exception as exc:
                logger.exception("model %s/%s failed its warm-up run", name, v)
                errors.append(f"{d}: the warm-up run failed ({type(exc).__name__})")
                self._load_failed(name, "warm-up run failed")
                continue
            self.versions.add(lm)
            loaded.append(v)
        return loaded, errors

    def _apply_policy(
        self, name: str, serving: Serving, selected: list[str], drain_s: float
    ) -> None:
        """Take a model's serving.toml: its labels, and unload the versions it does not
        select (their sessions drain)."""
        if serving != self.versions.policy(name):
            self.versions.set_policy(name, serving)
            logger.info("model %s: serving.toml applied: %s", name, serving.model_dump())
            self._versions_changed()
        dropped = [
            v for (n, v), lm in self.versions.loaded.items()
            if n == name and lm.retired_at is None and v not in selected
        ]  # fmt: skip
        for v in dropped:
            self.unload(name, v, drain_s)

    def unload(self, name: str, version: str = "", drain_s: float = 300.0) -> list[str]:
        """Stop a model's versions (all, or one) from starting sessions; their sessions go on
        for drain_s seconds, then are refused; each version is freed when its last session is
        gone (reap_versions). Returns the versions unloaded."""
        lms = [
            lm
            for (n, v), lm in self.versions.loaded.items()
            if n == name and (not version or v == version) and lm.retired_at is None
        ]
        if not lms:
            what = (
                f"version {version[:64]!r} of model {name[:64]!r}" if version else repr(name[:64])
            )
            raise NotFound(f"{what} is not loaded")
        for lm in lms:
            self.versions.retire(lm, drain_s)
            logger.info(
                "model %s unloading: no new sessions; %d sessions may go on for %.0fs",
                lm.label, len(lm.store), drain_s,
            )  # fmt: skip
        self.reap_versions()
        self._versions_changed()
        return [lm.version for lm in lms]

    async def poll(self, drain_s: float = 300.0) -> tuple[list[str], list[str]]:
        """One look at the repository directory: per model, the versions its serving.toml
        selects (every version without one) among those present are loaded, loaded ones it
        does not select (or whose directory is gone) are unloaded (drain_s as unload's), and
        its labels are taken. A version that fails its checks is logged once per change of
        its manifest, not on every poll, and left out of the selection (the policy picks among
        the others); an invalid serving.toml is logged once per change and the last valid one
        stays. A loaded version whose manifest changed is reloaded once no session is on it
        (checked as a new one; never with a shared store). Returns (labels loaded or reloaded,
        labels unloaded)."""
        async with self._control:
            return await self._poll(drain_s)

    async def _poll(self, drain_s: float) -> tuple[list[str], list[str]]:
        loaded: list[str] = []
        before = {lm.label for lm in self.versions.loaded.values() if lm.retired_at is None}
        names: set[str] = set()
        for model_dir in model_dirs(self.repository.root):
            name = model_dir.name
            if not is_model_name(name):
                continue
            names.add(name)
            found: dict[str, float] = {}
            for d in version_dirs(model_dir):
                with contextlib.suppress(OSError):  # no manifest (yet): not a version
                    found[d.name] = (d / "manifest.json").stat().st_mtime
            serving = self._poll_policy(model_dir)
            for v, mtime in found.items():
                lm = self.versions.loaded.get((name, v))
                if lm is None or lm.retired_at is not None:
                    continue
                if self._changed_on_disk(lm, mtime):
                    self._reload_due.add(lm.mv.key)
                    logger.warning(
                        "model %s changed on disk while loaded; it reloads once no session is "
                        "on it (sessions stay on the weights they started on)", lm.label,
                    )  # fmt: skip
                if lm.mv.key in self._reload_due and await self._reload(lm):
                    loaded.append(lm.label)
            usable = [v for v, t in found.items() if self._poll_failed.get((name, v)) != t]
            problems = serving.check(serving.version_policy.select(usable))
            if problems and serving != self.versions.policy(name):
                # labels that do not fit the file's own policy: the last valid file stays whole
                self._policy_refused(model_dir, "; ".join(problems))
                serving = self.versions.policy(name)
            while True:  # a version refused drops out, and the policy picks among the rest
                usable = [v for v, t in found.items() if self._poll_failed.get((name, v)) != t]
                selected = serving.version_policy.select(usable)
                missing = [
                    v for v in selected
                    if (lm := self.versions.loaded.get((name, v))) is None or lm.retired_at
                ]  # fmt: skip
                if not missing:
                    break
                got, errors = await self._load_versions(name, missing)
                loaded += [f"{name}:{v}" for v in got]
                for v in missing:
                    if v not in got:
                        self._poll_failed[(name, v)] = found[v]
                    else:
                        self._poll_failed.pop((name, v), None)
                if got:
                    self._versions_changed()
                if errors:
                    logger.error("model %s: not loaded: %s", name, "; ".join(errors))
            problems = serving.check(selected)
            if problems and serving != self.versions.policy(name):
                # a labelled version was refused: its versions as selected, the labels as were
                self._policy_refused(model_dir, "; ".join(problems))
                serving = Serving(
                    version_policy=serving.version_policy,
                    labels=self.versions.policy(name).labels,
                )
            self._apply_policy(name, serving, selected, drain_s)
        for (n, v), lm in list(self.versions.loaded.items()):  # whole models removed
            if n not in names and lm.retired_at is None:
                self.unload(n, v, drain_s)
        after = {lm.label for lm in self.versions.loaded.values() if lm.retired_at is None}
        return loaded, sorted(before - after)

    def _poll_policy(self, model_dir: Path) -> Serving:
        """A model's serving.toml for poll: the last valid one while it is invalid."""
        try:
            serving = read_policy(model_dir)
        except PolicyError as exc:
            self._policy_refused(model_dir, str(exc))
            return self.versions.policy(model_dir.name)
        self._policy_failed.pop(model_dir.name, None)
        return serving

    def _policy_refused(self, model_dir: Path, why: str) -> None:
        mtime = policy_mtime(model_dir)
        name = model_dir.name
        if name in self._policy_failed and self._policy_failed[name] == mtime:
            return  # logged already, and not changed since
        self._policy_failed[name] = mtime
        logger.error("model %s: %s not applied: %s", name, POLICY_FILE, why)
        self._load_failed(name, why)

    async def _reload(self, lm: LoadedModel) -> bool:
        """Load a changed version again in place, if no session is on it (with a shared
        store, sessions may live on it anywhere: never); True when it was reloaded. Refused
        files are logged and counted once; the version serves on as loaded."""
        if self.settings.state_store != "memory" or len(lm.store) or not lm.scheduler.idle:
            return False
        key = lm.mv.key
        self._reload_due.discard(key)
        mv, errs = await asyncio.to_thread(load_version, lm.mv.directory, True)
        if mv is None:
            why = "; ".join(str(e) for e in errs)
            logger.error("model %s not reloaded, it serves as loaded: %s", lm.label, why)
            self._load_failed(key[0], why)
            return False
        if mv.manifest == lm.mv.manifest:
            return False  # touched, not changed
        try:
            new = await self._load_one(mv, restore=False)
        except Exception:
            logger.exception("model %s not reloaded: its warm-up run failed", lm.label)
            self._load_failed(key[0], "warm-up run failed")
            return False
        if len(lm.store) or not lm.scheduler.idle:  # a session came meanwhile: next poll
            new.scheduler.close()
            self._reload_due.add(key)
            return False
        self.versions.drop(lm)
        self.versions.add(new)
        lm.scheduler.close()
        logger.info("model %s reloaded (sha256 %s)", new.label, mv.manifest.sha256[:12])
        self._versions_changed()
        return True

    def _changed_on_disk(self, lm: LoadedModel, mtime: float) -> bool:
        seen = self._poll_mtime.setdefault(lm.mv.key, mtime)
        if seen == mtime:
            return False
        self._poll_mtime[lm.mv.key] = mtime
        return True

    def reap_versions(self) -> list[str]:
        """Free unloaded versions whose last session is gone; returns their labels."""
        gone = [
            lm
            for lm in self.versions.loaded.values()
            if lm.retired_at is not None and len(lm.store) == 0 and lm.scheduler.idle
        ]
        for lm in gone:
            self.versions.drop(lm)
            lm.scheduler.close()
            logger.info("model %s unloaded", lm.label)
            path = self._snapshot_path(lm.mv.manifest)
            if path is not None:  # else a restart would bring back sessions that went
                path.unlink(missing_ok=True)
        if gone:
            self._versions_changed()
        return [lm.label for lm in gone]

    def _versions_changed(self) -> None:
        if self.on_versions_changed is not None:
            self.on_versions_changed()

    # -- background work -----------------------------------------------------------------------

    def reap(self, now: float | None = None) -> int:
        """Expire idle sessions of every model; returns how many."""
        ttl = self.settings.session_ttl_s
        return sum(lm.scheduler.reap(ttl, now) for lm in self.models.values())

    async def _reap_forever(self) -> None:
        while True:
            await asyncio.sleep(self.settings.reap_interval_s)
            try:
                self.reap()
                self.reap_versions()
            except Exception:
                logger.exception("session reaper failed")

    async def _snapshot_forever(self) -> None:
        while True:
            await asyncio.sleep(self.settings.snapshot_interval_s)
            try:
                await self.snapshot()
            except Exception:
                logger.exception("periodic snapshot failed")

    def _snapshot_path(self, m: Manifest) -> Path | None:
        d = self.settings.snapshot_dir
        return None if d is None else d / f"{m.name}-{m.version}.npz"

    async def snapshot(self) -> int:
        """Write every model's sessions to snapshot_dir; returns the sessions written."""
        directory = self.settings.snapshot_dir
        if directory is None:
            return 0
        directory.mkdir(parents=True, exist_ok=True)
        total = 0
        async with self._snapshot_lock:  # one writer per file: periodic and final never overlap
            for lm in list(self.models.values()):  # versions may come and go meanwhile
                path = self._snapshot_path(lm.mv.manifest)
                assert path is not None
                # Captured on the loop, between ticks: a consistent copy; written off the loop.
                snap = lm.store.capture()
                await asyncio.to_thread(write_snapshot, path, snap, lm.snapshot_meta)
                if self.models.get(lm.mv.key) is not lm:  # freed while it was written
                    path.unlink(missing_ok=True)
                    continue
                total += len(snap.keys)
                logger.info(
                    "%s: snapshot of %d sessions written to %s", lm.label, len(snap.keys), path
                )
        return total

    def _restore(self, lm: LoadedModel) -> None:
        """Load the model's snapshot into its empty store, at start, before it serves."""
        path = self._snapshot_path(lm.mv.manifest)
        if path is None or not path.exists():
            return
        m = lm.mv.manifest
        try:
            snap = read_snapshot(path, lm.snapshot_meta, m.layers, m.hidden_size, m.output_dim)
        except Exception:
            # Serve with no sessions rather than not at all, and move the file aside so the
            # next snapshot does not overwrite what an operator may want to inspect.
            kept = path.with_name(f"{path.name}.bad-{int(time.time())}")
            path.replace(kept)
            logger.exception("%s: snapshot %s not restored (kept as %s)", lm.label, path, kept)
            return
        n = lm.store.restore(snap, lm.scheduler.replay)
        if n < len(snap.keys):
            logger.warning(
                "%s: session cap reached; %d sessions not restored", path, len(snap.keys) - n
            )


def _same_inputs(a: LoadedModel, b: LoadedModel) -> bool:
    """Whether a frame decoded and checked for b's model is one for a's too."""
    ma, mb = a.mv.manifest, b.mv.manifest
    return (ma.kind, ma.input_dim, ma.output_dim) == (mb.kind, mb.input_dim, mb.output_dim)


def _moved(moving: dict[str, LoadedModel], key: str, fut: asyncio.Future[Any]) -> None:
    _retrieve(fut)
    moving.pop(key, None)


def _retrieve(fut: asyncio.Future[Any]) -> None:
    if not fut.cancelled():
        fut.exception()  # an end of a copy that is gone anyway: nobody waits for it


async def _merge(
    ids: list[str], rows: list[tuple[str, np.ndarray]], futs: list[asyncio.Future[StepResult]]
) -> StepResult:
    """One answer from the answers of a request's parts on several versions."""
    results = await asyncio.gather(*futs, return_exceptions=True)
    for r in results:
        if isinstance(r, BaseException):
            raise r
    n = len(ids)
    seq = np.zeros(n, np.int64)
    nxt = np.zeros(n, np.int64)
    replayed = np.zeros(n, bool)
    y: list[np.ndarray] = [np.empty(0, np.float32)] * n
    versions = [""] * n
    for (version, part), res in zip(rows, results, strict=True):
        assert isinstance(res, StepResult)
        seq[part], nxt[part], replayed[part] = res.seq, res.next_seq, res.replayed
        for j, i in enumerate(part.tolist()):
            y[i] = res.y[j]
            # the part's own answer says where it ran (it may have followed its sessions)
            versions[i] = res.versions[j] if res.versions else (res.version or version)
    return StepResult(ids, seq, nxt, replayed, y, "", versions)
