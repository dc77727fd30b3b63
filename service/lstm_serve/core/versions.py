"""Which versions of each model are loaded, which one serves new sessions, and where a request
that names no version goes.

A session belongs to the version it started on. A request that names no version continues
each of its sessions on the version that holds it (the default version first, then the others
from newest to oldest); a session no version holds, and every reset, starts on the default
version: the one labelled stable in the model's serving.toml (policy.py), else the newest
loaded version that is not being unloaded, except the canary's share of them, which start on
the version labelled canary. With one version per model (the common case) routing is one
dictionary lookup, as before versions could change.

An unloaded version is retired: it admits no new sessions at once, its sessions go on until
they end, reset or idle out, and after its drain deadline every step on it is refused with
FAILED_PRECONDITION naming the version and saying to reset. The engine frees it when its last
session is gone.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from enum import StrEnum

import numpy as np

from lstm_serve.core.errors import FailedPrecondition, NotFound
from lstm_serve.core.policy import DEFAULT, Serving, canary_rows
from lstm_serve.core.repository import Kind, ModelVersion, Repository
from lstm_serve.core.scheduler import Scheduler
from lstm_serve.core.store import SessionStore
from lstm_serve.core.sync import StateSync


class ModelControl(StrEnum):
    """How model versions change while serving."""

    none = "none"  # the versions found at start, until a restart
    poll = "poll"  # the repository directory is read every model_poll_s
    explicit = "explicit"  # on request only (repository calls, the CLI)


@dataclass(eq=False)
class LoadedModel:
    mv: ModelVersion
    scheduler: Scheduler
    label: str
    # Set when the version is being unloaded: (time.monotonic() of the request, drain deadline)
    retired_at: float | None = None
    drain_deadline: float | None = None

    @property
    def store(self) -> SessionStore:
        return self.scheduler.store

    @property
    def sync(self) -> StateSync | None:
        return self.scheduler.sync

    @property
    def token(self) -> bool:
        return self.mv.manifest.kind is Kind.token

    @property
    def version(self) -> str:
        return self.mv.manifest.version

    @property
    def snapshot_meta(self) -> dict[str, object]:
        m = self.mv.manifest
        return {
            "name": m.name, "version": m.version, "layers": m.layers,
            "hidden_size": m.hidden_size, "output_dim": m.output_dim, "sha256": m.sha256,
        }  # fmt: skip


class Versions:
    """The loaded model versions; the repository holds the ones that serve new sessions."""

    def __init__(self, repository: Repository) -> None:
        self.repository = repository  # serving versions only: the default is its newest
        self.loaded: dict[tuple[str, str], LoadedModel] = {}
        self._resolved: dict[tuple[str, str], LoadedModel] = {}
        # name -> loaded versions other than the default, newest first (empty: one version)
        self._others: dict[str, list[LoadedModel]] = {}
        # name -> its serving.toml as last applied; name -> (canary version, its share)
        self.policies: dict[str, Serving] = {}
        self._canary: dict[str, tuple[LoadedModel, float]] = {}
        # session key -> the version a reset moved it to, while its copy elsewhere is ended
        self.moving: dict[str, LoadedModel] = {}

    def policy(self, name: str) -> Serving:
        return self.policies.get(name, DEFAULT)

    def set_policy(self, name: str, serving: Serving) -> None:
        if serving == DEFAULT:
            self.policies.pop(name, None)
        else:
            self.policies[name] = serving
        self._changed()

    def add(self, lm: LoadedModel) -> None:
        m = lm.mv.manifest
        self.loaded[lm.mv.key] = lm
        self.repository.models.setdefault(m.name, {})[m.version] = lm.mv
        self._changed()

    def retire(self, lm: LoadedModel, drain_s: float) -> None:
        """Admit no new sessions on lm; its sessions may go on for drain_s seconds."""
        now = time.monotonic()
        lm.retired_at, lm.drain_deadline = now, now + drain_s
        m = lm.mv.manifest
        versions = self.repository.models.get(m.name, {})
        versions.pop(m.version, None)
        if not versions:
            self.repository.models.pop(m.name, None)
        self._changed()

    def unretire(self, lm: LoadedModel) -> None:
        """Take a version being unloaded back into service."""
        lm.retired_at = lm.drain_deadline = None
        self.add(lm)

    def drop(self, lm: LoadedModel) -> None:
        """Forget a retired version (its last session is gone)."""
        self.loaded.pop(lm.mv.key, None)
        self._changed()

    def _changed(self) -> None:
        self._resolved.clear()
        self._others.clear()
        self._canary.clear()
        for (name, _), lm in self.loaded.items():
            self._others.setdefault(name, []).append(lm)
        for name, lms in list(self._others.items()):
            default = self._default(name)
            rest = [lm for lm in lms if lm is not default]
            rest.sort(key=lambda lm: int(lm.version), reverse=True)
            self._others[name] = rest
            labels = self.policy(name).labels
            canary = self._serving(name, labels.canary)
            if canary is not None and canary is not default and labels.canary_share > 0:
                self._canary[name] = (canary, labels.canary_share)

    def _serving(self, name: str, version: int | None) -> LoadedModel | None:
        """The loaded version of that number, if it takes new sessions."""
        if version is None:
            return None
        lm = self.loaded.get((name, str(version)))
        return lm if lm is not None and lm.retired_at is None else None

    def _default(self, name: str) -> LoadedModel | None:
        stable = self._serving(name, self.policy(name).labels.stable)
        if stable is not None:
            return stable
        try:
            mv = self.repository.get(name, "")
        except NotFound:
            return None
        return self.loaded.get(mv.key)

    def default_version(self, name: str) -> str:
        """The version new sessions of name go to ("" when none takes them)."""
        lm = self._default(name)
        return "" if lm is None else lm.version

    def canary(self, name: str) -> tuple[LoadedModel, float] | None:
        """The version labelled canary and its share of new sessions, while it serves."""
        return self._canary.get(name)

    def get(self, name: str, version: str = "") -> LoadedModel:
        """A loaded version (retired ones included), or the default version of name."""
        lm = self._resolved.get((name, version))
        if lm is not None:
            return lm
        if version and (name, version) in self.loaded:
            lm = self.loaded[(name, version)]
        elif not version and (found := self._default(name)) is not None:
            lm = found
        else:
            if not version and name not in self.repository.models and self._retired_only(name):
                raise NotFound(f"model {name!r} has no version serving new sessions")
            mv = self.repository.get(name, version)
            found = self.loaded.get(mv.key)
            if found is None:
                raise NotFound(f"model {name!r} version {mv.manifest.version!r} is not loaded")
            lm = found
        self._resolved[(name, version)] = lm
        return lm

    def _retired_only(self, name: str) -> bool:
        return any(n == name for n, _ in self.loaded)

    def others(self, name: str) -> list[LoadedModel]:
        """Loaded versions of name besides the default, newest first."""
        return self._others.get(name, [])

    def route(
        self,
        default: LoadedModel,
        keys: list[str],
        reset: np.ndarray,
        once: np.ndarray | None = None,
    ) -> list[tuple[LoadedModel, np.ndarray]]:
        """Where the rows of a request that names no version go: [(version, rows)], the
        default's first. A row goes to the version that holds its session (or that a reset
        is moving it to); a row no version holds, and every reset, to the default version or
        (its share of session ids) to the canary. once: rows of one-request sessions (reset
        and ended in the request: stateless calls), which always go to the default."""
        name = default.mv.manifest.name
        others = self.others(name)
        n = len(keys)
        on_default = (default.store.lookup(keys) >= 0) & ~reset
        todo = ~on_default & ~reset
        parts: list[tuple[LoadedModel, np.ndarray]] = []
        if self.moving:  # rare: a reset onto another version is ending the session's copy
            to: dict[int, list[int]] = {}
            for i, k in enumerate(keys):
                lm = self.moving.get(k)
                if lm is not None and not reset[i] and self.loaded.get(lm.mv.key) is lm:
                    to.setdefault(id(lm), []).append(i)
                    on_default[i], todo[i] = lm is default, False
            for idx in to.values():
                lm = self.moving[keys[idx[0]]]
                if lm is not default:
                    parts.append((lm, np.array(idx, np.int64)))
        for lm in others:
            if not todo.any():
                break
            held = todo & (lm.store.lookup(keys) >= 0)
            if held.any():
                parts.append((lm, np.flatnonzero(held)))
                todo &= ~held
        taken = np.zeros(n, bool)
        for _, rows in parts:
            taken[rows] = True
        canary = self._canary.get(name)
        if canary is not None:
            free = ~taken & ~on_default if once is None else ~taken & ~on_default & ~once
            fresh = np.flatnonzero(free)  # new sessions and resets
            chosen = fresh[canary_rows(keys, fresh, canary[1])]
            if len(chosen):
                taken[chosen] = True
                parts.append((canary[0], chosen))
        if len(parts) > 1:  # one part per version, rows in request order
            by: dict[int, tuple[LoadedModel, list[np.ndarray]]] = {}
            for lm, rows in parts:
                by.setdefault(id(lm), (lm, []))[1].append(rows)
            parts = [(lm, np.sort(np.concatenate(rs))) for lm, rs in by.values()]
        return [(default, np.flatnonzero(~taken)), *parts]


def check_retired(lm: LoadedModel, default: str, exists: np.ndarray, reset: np.ndarray) -> None:
    """Refuse what a retired version may no longer do: start sessions (at once), or step at
    all (after its drain deadline). default: the version new sessions go to, for the message."""
    m = lm.mv.manifest
    where = f"on version {default} (naming no version)" if default else "once a version is loaded"
    if lm.drain_deadline is not None and time.monotonic() >= lm.drain_deadline:
        raise FailedPrecondition(
            f"model {m.name!r} version {m.version!r} was unloaded; send the session's next step "
            f"with reset to start it again {where}"
        )
    if (~exists | reset).any():
        raise FailedPrecondition(
            f"model {m.name!r} version {m.version!r} is being unloaded and starts no new "
            f"sessions; start them {where}"
        )
