"""The repository calls (index, load, unload) as both protocols serve them: the Open Inference
Protocol's RepositoryIndex / RepositoryModelLoad / RepositoryModelUnload over gRPC, and their
HTTP/REST form. Load and unload are admin calls: with auth on, only the clients named in
admin_clients may make them; and only with model_control explicit (with poll the repository
directory decides, with none the versions found at start serve until a restart)."""

from __future__ import annotations

from dataclasses import dataclass

from lstm_serve.core.engine import Engine
from lstm_serve.core.errors import FailedPrecondition, InvalidArgument, PermissionDenied
from lstm_serve.core.repository import load_version, model_dirs, version_dirs
from lstm_serve.core.versions import ModelControl


@dataclass(frozen=True)
class IndexEntry:
    name: str
    version: str
    state: str  # READY, UNLOADING or UNAVAILABLE (Triton's words)
    reason: str


@dataclass(frozen=True)
class ModelControlCalls:
    engine: Engine
    mode: ModelControl
    drain_s: float
    auth: bool  # requests carry a principal (tokens or mTLS)
    admins: frozenset[str]

    def _admit(self, principal: str, what: str) -> None:
        if self.mode is not ModelControl.explicit:
            raise FailedPrecondition(
                f"{what} needs model_control explicit (this server: {self.mode.value})"
            )
        if self.auth and principal not in self.admins:
            raise PermissionDenied(f"{what} is an admin call; this client is not in admin_clients")

    def index(self, ready_only: bool = False) -> list[IndexEntry]:
        """Every version in the repository directory and every loaded one, with its state."""
        engine = self.engine
        out: dict[tuple[str, str], IndexEntry] = {}
        for key, lm in engine.models.items():
            if lm.retired_at is None:
                out[key] = IndexEntry(*key, "READY", "")
            else:
                out[key] = IndexEntry(
                    *key, "UNLOADING", f"unloaded; {len(lm.store)} sessions still on it"
                )
        if not ready_only:
            for model_dir in model_dirs(engine.repository.root):
                for d in version_dirs(model_dir):
                    key = (model_dir.name, d.name)
                    if key not in out:
                        _, errs = load_version(d, check_graph=False)
                        reason = "; ".join(str(e) for e in errs) if errs else "not loaded"
                        out[key] = IndexEntry(*key, "UNAVAILABLE", reason[:500])
        entries = [e for e in out.values() if not ready_only or e.state == "READY"]
        return sorted(entries, key=lambda e: (e.name, int(e.version)))

    async def load(self, principal: str, name: str, version: str = "") -> list[str]:
        self._admit(principal, "loading a model")
        if not name:
            raise InvalidArgument("model_name is empty")
        return await self.engine.load(name, version, self.drain_s)

    def unload(self, principal: str, name: str, version: str = "") -> list[str]:
        self._admit(principal, "unloading a model")
        if not name:
            raise InvalidArgument("model_name is empty")
        return self.engine.unload(name, version, self.drain_s)
