"""Which versions of a model load, and which serve its new sessions: the model directory's
optional serving.toml (models/<name>/serving.toml), read at start, by every poll, and by a
load request that names no version.

    [version_policy]      # which versions load; neither key: every version
    latest = 2            # the newest 2 versions
    # specific = [1, 3]   # exactly these

    [labels]              # which loaded version new sessions go to; none: the newest
    stable = 1            # new sessions (and stateless calls) go here...
    canary = 2            # ...except canary_share of new sessions, chosen by session id
    canary_share = 0.1

Without the file every version loads and new sessions go to the newest (as before the file
existed). Labels must name versions the policy loads.
"""

from __future__ import annotations

import tomllib
import zlib
from pathlib import Path
from typing import Self

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

POLICY_FILE = "serving.toml"

# Canary choice: a session goes to the canary when crc32(key) % BUCKETS < share * BUCKETS, so a
# session id always lands on the same side (its retries and resets too).
BUCKETS = 10_000


class VersionPolicy(BaseModel):
    model_config = ConfigDict(extra="forbid")

    latest: int | None = Field(default=None, ge=1, description="Load the newest N versions.")
    specific: list[int] | None = Field(
        default=None, min_length=1, description="Load these versions."
    )

    @model_validator(mode="after")
    def _one(self) -> Self:
        if self.latest is not None and self.specific is not None:
            raise ValueError("set latest or specific, not both")
        return self

    def select(self, versions: list[str]) -> list[str]:
        """The versions (whole numbers as text) this policy loads, in ascending order."""
        ordered = sorted(versions, key=int)
        if self.latest is not None:
            return ordered[-self.latest :]
        if self.specific is not None:
            wanted = set(self.specific)
            return [v for v in ordered if int(v) in wanted]
        return ordered


class Labels(BaseModel):
    model_config = ConfigDict(extra="forbid")

    stable: int | None = Field(default=None, ge=0, description="The version new sessions go to.")
    canary: int | None = Field(default=None, ge=0, description="The version a share of them go to.")
    canary_share: float = Field(default=0.0, ge=0.0, le=1.0, description="That share, 0-1.")

    @model_validator(mode="after")
    def _canary(self) -> Self:
        if self.canary is not None and self.stable is None:
            raise ValueError("a canary needs a stable version beside it")
        if self.canary_share > 0 and self.canary is None:
            raise ValueError("canary_share needs a canary version")
        if self.canary is not None and self.canary == self.stable:
            raise ValueError("canary and stable name the same version")
        return self


class Serving(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version_policy: VersionPolicy = Field(default_factory=VersionPolicy)
    labels: Labels = Field(default_factory=Labels)

    def check(self, selected: list[str]) -> list[str]:
        """Problems of the labels against the versions the policy selects (empty: none)."""
        out = []
        for label in ("stable", "canary"):
            v = getattr(self.labels, label)
            if v is not None and str(v) not in selected:
                out.append(
                    f"label {label} names version {v}, which the version policy does not load "
                    f"(it loads {', '.join(selected) or 'none'})"
                )
        return out


DEFAULT = Serving()


class PolicyError(ValueError):
    """serving.toml is unreadable or invalid; the message says where and why."""


def read_policy(model_dir: Path) -> Serving:
    """The model's serving policy (the default when it has no serving.toml)."""
    path = model_dir / POLICY_FILE
    try:
        text = path.read_text()
    except FileNotFoundError:
        return DEFAULT
    except OSError as exc:
        raise PolicyError(f"{path}: {exc.strerror}") from None
    try:
        return Serving.model_validate(tomllib.loads(text))
    except tomllib.TOMLDecodeError as exc:
        raise PolicyError(f"{path}: not TOML: {exc}") from None
    except ValidationError as exc:
        why = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'file'}: {e['msg']}" for e in exc.errors()
        )
        raise PolicyError(f"{path}: {why}") from None


def resolve(model_dir: Path, versions: list[str]) -> tuple[Serving, list[str]]:
    """The model's serving.toml and which of versions it selects; PolicyError when the file
    is invalid or its labels name versions it does not select."""
    serving = read_policy(model_dir)
    selected = serving.version_policy.select(versions)
    problems = serving.check(selected)
    if problems:
        raise PolicyError(f"{model_dir / POLICY_FILE}: " + "; ".join(problems))
    return serving, selected


def policy_mtime(model_dir: Path) -> float | None:
    """When serving.toml last changed (None: there is none), for polls to notice edits."""
    try:
        return (model_dir / POLICY_FILE).stat().st_mtime
    except OSError:
        return None


def canary_rows(keys: list[str], rows: np.ndarray, share: float) -> np.ndarray:
    """Which of rows (indices into keys) go to the canary: share of session keys, stably."""
    if share <= 0 or not len(rows):
        return np.zeros(len(rows), bool)
    cut = round(share * BUCKETS)
    buckets = np.fromiter(
        (zlib.crc32(keys[i].encode()) % BUCKETS for i in rows.tolist()), np.int64, len(rows)
    )
    return buckets < cut
