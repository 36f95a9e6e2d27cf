"""Ops from outside the built-in library: a package entry-point group and named modules.

A package makes its ops available to every node and loader by declaring an
entry point in the group ``nearstore.ops`` (the value is the module that
registers them with ``@register``)::

    [project.entry-points."nearstore.ops"]
    my_ops = "my_package.ops"

A node also imports the modules given with ``--ops-module`` (``nearstore node
serve`` and ``nearstore up``): a dotted module name on the path, or a ``.py``
file. A module that fails to import never stops a node: it keeps its
built-in ops, the ops the module registered before failing are removed, and
the error (with its traceback) is reported by ``import_errors()`` (a node's
``capabilities`` action, and its refusal of a pipeline that needs such an op).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import logging
import sys
import threading
import traceback
from pathlib import Path
from typing import Iterable

from nearstore.ops import base

__all__ = ["ENTRY_POINT_GROUP", "load_op_modules", "import_errors", "op_origins"]

ENTRY_POINT_GROUP = "nearstore.ops"

log = logging.getLogger(__name__)

_LOCK = threading.Lock()
_ERRORS: dict[str, str] = {}  # source ("module X" / "entry point Y") -> error and traceback
_ORIGIN: dict[str, str] = {}  # op name -> the source that registered it
_DONE: set[str] = set()


def _import(source: str) -> None:
    if source.endswith(".py") or "/" in source:
        path = Path(source).resolve()
        if not path.is_file():
            raise FileNotFoundError(f"no such op module file: {path}")
        name = f"nearstore_user_ops_{path.stem}"
        spec = importlib.util.spec_from_file_location(name, path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            sys.modules.pop(name, None)
            raise
    else:
        importlib.import_module(source)


def _load_one(label: str, load) -> None:  # noqa: ANN001
    before = set(base.registry())
    try:
        load()
    except Exception:  # noqa: BLE001 - any failure of user code is reported, never fatal
        for name in set(base.registry()) - before:  # no half-loaded module: its ops go with it
            base.unregister(name)
        err = traceback.format_exc(limit=8)
        _ERRORS[label] = err
        log.warning("op %s failed to import; built-in ops remain available:\n%s", label, err)
        return
    for name in set(base.registry()) - before:
        _ORIGIN[name] = label


def load_op_modules(modules: Iterable[str] = (), *, entry_points: bool = True) -> dict[str, str]:
    """Import the op modules of the ``nearstore.ops`` entry points and ``modules``; each once per process.

    Returns the import errors so far (source -> message with traceback); never raises for user code.
    """
    with _LOCK:
        if entry_points and "entry points" not in _DONE:
            _DONE.add("entry points")
            for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
                _load_one(f"entry point {ep.name} ({ep.value})", ep.load)
        for m in modules:
            label = f"module {m}"
            if label in _DONE:
                continue
            _DONE.add(label)
            _load_one(label, lambda m=m: _import(m))
        return dict(_ERRORS)


def import_errors() -> dict[str, str]:
    """Op modules that failed to import in this process: source -> error with traceback."""
    with _LOCK:
        return dict(_ERRORS)


def op_origins() -> dict[str, str]:
    """Registered op name -> where it came from ("builtin", or the module / entry point)."""
    with _LOCK:
        return {name: _ORIGIN.get(name, "builtin") for name in base.registry()}

