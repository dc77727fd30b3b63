"""The training extra (`pip install -e '.[train]'`): checked before a command needs it.

`make serve` installs only what serving needs, so `lstm-serve train` and `lstm-serve export`
may run where torch is missing; they say how to install it instead of "No module named 'torch'".
"""

from __future__ import annotations

import importlib
import shlex
import sys
from importlib.metadata import PackageNotFoundError, requires
from pathlib import Path

# The root of the source tree (service/lstm_serve/training/extra.py -> the repository).
ROOT = Path(__file__).resolve().parents[3]


class MissingExtra(RuntimeError):
    """A module of the training extra cannot be imported; the message says how to install it."""


def require_training_extra(command: str, modules: tuple[str, ...]) -> None:
    """Raise MissingExtra naming the missing modules and the exact install command."""
    missing = []
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
            # Stop at the first: later ones may import it (scikit-learn probes torch), and
            # installing the extra brings them all.
            break
    if missing:
        raise MissingExtra(
            f"lstm-serve {command} needs the training extra, and {', '.join(missing)} cannot "
            f"be imported here (`make serve` installs only what serving needs): install it "
            f"with `{install_command()}`{_pin_note()}"
        )


def install_command() -> str:
    """pip for the interpreter running now, on this source tree, with the train extra."""
    here = Path.cwd()
    python = Path(sys.executable)
    shown = python.relative_to(here) if python.is_relative_to(here) else python
    project = "." if here.resolve() == ROOT else str(ROOT)
    return f"{shlex.quote(str(shown))} -m pip install -e {shlex.quote(project + '[train]')}"


def _pin_note() -> str:
    """The torch pin of pyproject.toml, as installed, so the message stays true to it."""
    try:
        wanted = requires("lstm-serve") or []
    except PackageNotFoundError:
        return ""
    for req in wanted:
        spec, _, marker = req.partition(";")
        if spec.replace(" ", "").startswith("torch==") and "train" in marker:
            return f" ({spec.strip()}, as pyproject.toml pins it: never a newer torch)"
    return ""
