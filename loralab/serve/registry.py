"""Which adapters the server knows (name -> directory) and which are resident in the model (LRU).

    known     every adapter a request may name: those given at start and those added at run time
    resident  the adapters loaded into the model now, least recently used first; beyond max_loaded the least
              recently used one not needed by the batch being formed is unloaded, and is loaded again from
              its directory when a request names it

Adapters added at run time must live inside one of the allowed roots (`--adapter-dir`): the path is resolved
(symlinks and `..` included) and refused unless it lies under a root, so a request cannot read an arbitrary
directory.  Removing an adapter takes it out of `known` at once (new requests get 404); it stays resident
until the requests already accepted for it have finished (`in_flight`).

Only the engine's worker thread calls ensure() and collect() (they change the model); the rest is guarded by
a lock and may be called from HTTP handlers.
"""

from __future__ import annotations

import os
import re
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Callable, Iterable

from torch import nn

__all__ = ["AdapterRegistry", "ServeError", "check_adapter_name"]

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_\-]{0,63}$")


class ServeError(ValueError):
    """A request the server refuses: an HTTP status and a message that says what to change (a ValueError, so
    a bad startup option reaches the CLI's error report)."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.kind = status, message, kind


def check_adapter_name(name) -> str:
    if not isinstance(name, str) or not _NAME.match(name):
        raise ServeError(400, f"adapter name {name!r} is not allowed; use 1-64 letters, digits, '_' or '-', "
                              f"starting with a letter or digit")
    return name


class AdapterRegistry:
    """known adapters, allowed roots, LRU residency.  load(model, directory, name) puts an adapter on the model
    (default: loralab.load_adapter, inactive); unload(model, name) removes it (default: delete_adapter)."""

    def __init__(self, model: nn.Module, adapters: dict[str, str] | None = None, *, roots: Iterable = (),
                 max_loaded: int | None = None, base_name: str = "base", load: Callable | None = None,
                 unload: Callable | None = None):
        if max_loaded is not None and max_loaded < 1:
            raise ValueError(f"max_loaded={max_loaded}: at least one adapter must fit; pass None for no limit")
        self.model, self.max_loaded, self.base_name = model, max_loaded, base_name
        self.roots = [Path(r).resolve() for r in roots]
        for root in self.roots:
            if not root.is_dir():
                raise FileNotFoundError(f"adapter root {root} is not a directory; pass an existing --adapter-dir")
        self._load, self._unload = load or _load_adapter, unload or _delete_adapter
        self.known: dict[str, Path] = {}
        self.resident: OrderedDict[str, Path] = OrderedDict()
        self.in_flight: dict[str, int] = {}
        self.snapshot: tuple = ()
        self.loads = self.evictions = 0
        self.lock = threading.Lock()
        for name, directory in (adapters or {}).items():  # given by the operator at start: trusted paths
            self.add(name, directory, trusted=True)

    # ---- the catalogue (any thread) -----------------------------------------------------------------------
    def names(self) -> list[str]:
        with self.lock:
            return list(self.known)

    def resolve(self, name: str | None) -> Path | None:
        """The directory of adapter `name` (None or the base's name: the base model, no adapter); 404 otherwise."""
        if name is None or name == self.base_name:
            return None
        with self.lock:
            if name in self.known:
                return self.known[name]
            known = [self.base_name] + list(self.known)
        raise ServeError(404, f"unknown model {name!r}; this server has {known}", "not_found_error")

    def allowed_path(self, path) -> Path:
        """`path` (absolute, or relative to a root) resolved, if it lies inside an allowed root; 403 otherwise."""
        if not self.roots:
            raise ServeError(403, "loading adapters at run time is off: start the server with --adapter-dir ROOT "
                                  "to allow adapters under ROOT", "permission_error")
        if not isinstance(path, str) or not path or "\x00" in path:
            raise ServeError(400, "'path' must be a non-empty string: an adapter directory under an allowed root")
        candidates = [Path(path).resolve()] if os.path.isabs(path) else [(r / path).resolve() for r in self.roots]
        for candidate in candidates:
            if any(candidate == r or r in candidate.parents for r in self.roots) and candidate.is_dir():
                return candidate
        raise ServeError(403, f"adapter path {path!r} is not a directory inside the allowed roots "
                              f"{[str(r) for r in self.roots]}", "permission_error")

    def add(self, name: str, directory, *, trusted: bool = False) -> Path:
        check_adapter_name(name)
        if name == self.base_name:
            raise ServeError(409, f"{name!r} is the base model's name; pick another adapter name", "conflict_error")
        path = Path(directory).resolve() if trusted else self.allowed_path(directory)
        if not (path / "adapter_config.json").is_file():
            raise ServeError(400, f"{path} holds no adapter_config.json; pass a directory written by "
                                  f"save_adapter or PEFT's save_pretrained")
        with self.lock:
            if name in self.known:
                raise ServeError(409, f"adapter {name!r} already exists; DELETE /v1/adapters/{name} first",
                                 "conflict_error")
            self.known[name] = path
        return path

    def remove(self, name: str) -> int:
        """Forget adapter `name`; returns how many accepted requests still use it (they finish)."""
        with self.lock:
            if name not in self.known:
                raise ServeError(404, f"unknown adapter {name!r}; this server has {list(self.known)}",
                                 "not_found_error")
            del self.known[name]
            return self.in_flight.get(name, 0)

    def begin(self, name: str | None) -> None:
        if name is not None:
            with self.lock:
                self.in_flight[name] = self.in_flight.get(name, 0) + 1

    def end(self, name: str | None) -> None:
        if name is not None:
            with self.lock:
                self.in_flight[name] -= 1

    # ---- residency (worker thread only) -------------------------------------------------------------------
    def ensure(self, wanted: dict[str, Path]) -> None:
        """Make every adapter in `wanted` ({name: directory}) resident, evicting the least recently used
        others beyond max_loaded; marks them most recently used."""
        if self.max_loaded is not None and len(wanted) > self.max_loaded:
            raise ValueError(f"{len(wanted)} adapters in one batch but max_loaded={self.max_loaded}")
        for name, path in wanted.items():
            if name in self.resident and self.resident[name] != path:   # removed and added again elsewhere
                self._drop(name)
            if name not in self.resident:
                while self.max_loaded is not None and len(self.resident) >= self.max_loaded:
                    victim = next(n for n in self.resident if n not in wanted)
                    self._drop(victim)
                    self.evictions += 1
                self._load(self.model, path, name)
                self.loads += 1
                self.resident[name] = path
            self.resident.move_to_end(name)
        self.snapshot = tuple(self.resident)

    def collect(self) -> None:
        """Unload adapters that were removed and have no request left."""
        with self.lock:
            gone = [n for n, p in self.resident.items()
                    if self.known.get(n) != p and not self.in_flight.get(n, 0)]
        for name in gone:
            self._drop(name)

    def _drop(self, name: str) -> None:
        self._unload(self.model, name)
        del self.resident[name]
        self.snapshot = tuple(self.resident)  # what other threads read (replaced whole, never mutated)

    def stats(self) -> dict:
        with self.lock:
            return {"known": len(self.known), "resident": list(self.snapshot), "loads": self.loads,
                    "evictions": self.evictions, "max_loaded": self.max_loaded}


def _load_adapter(model, path, name):
    from ..load import load_adapter
    load_adapter(model, path, name, activate=False)


def _delete_adapter(model, name):
    from ..inject import delete_adapter
    delete_adapter(model, name)
