"""Backends by name and by array type, imported only when first needed.

Built-in backends live in ``kvquant.backends``; third-party ones register an
entry point in the group ``kvquant.backends`` whose object is either a backend
(with a ``runtime``) or a zero-argument factory returning one. Dispatch by array
type follows einops: a framework is considered only if it is already imported
(present in ``sys.modules``), so looking up a NumPy array never imports torch,
and the answer is cached per array type.
"""
from __future__ import annotations

import importlib
import sys
import threading
from typing import Any, Dict, List, Optional

ENTRY_POINT_GROUP = "kvquant.backends"

# name -> (module that must already be imported for dispatch, module holding the backend)
BUILTIN_BACKENDS = {
    "numpy": ("numpy", "kvquant.backends.numpy"),
    "torch": ("torch", "kvquant.backends.torch"),
    "jax": ("jax", "kvquant.backends.jax"),
}

_lock = threading.RLock()
_loaded: Dict[str, Any] = {}
_by_type: Dict[type, Any] = {}
_entry_points_cache: Optional[Dict[str, Any]] = None


class BackendNotFoundError(LookupError):
    pass


def _entry_points() -> Dict[str, Any]:
    global _entry_points_cache
    if _entry_points_cache is None:
        from importlib.metadata import entry_points

        found = {}
        for ep in entry_points(group=ENTRY_POINT_GROUP):
            found.setdefault(ep.name, ep)
        _entry_points_cache = found
    return _entry_points_cache


def available_backends() -> List[str]:
    """Every backend name: built-in first, then entry points (nothing is imported)."""
    names = list(BUILTIN_BACKENDS)
    names += [n for n in sorted(_entry_points()) if n not in BUILTIN_BACKENDS]
    return names


def _instantiate(obj: Any, name: str) -> Any:
    if hasattr(obj, "create_backend"):
        obj = obj.create_backend()
    elif callable(obj) and not hasattr(obj, "runtime"):
        obj = obj()
    if not hasattr(obj, "runtime") or not hasattr(obj, "quantize_kv_int8"):
        raise TypeError(
            f"backend {name!r} did not provide a KvCacheQuantOps object with a runtime; got {obj!r}"
        )
    return obj


def get_backend(name: str) -> Any:
    """The backend registered under ``name``, imported on first use."""
    loaded = _loaded.get(name)
    if loaded is not None:  # lock-free, so torch.compile can trace a dispatch
        return loaded
    with _lock:
        if name in _loaded:
            return _loaded[name]
        if name in BUILTIN_BACKENDS:
            module_name = BUILTIN_BACKENDS[name][1]
            try:
                module = importlib.import_module(module_name)
            except ImportError as exc:
                raise BackendNotFoundError(
                    f"backend {name!r} needs {BUILTIN_BACKENDS[name][0]}, which is not installed: {exc}"
                ) from exc
            backend = _instantiate(module, name)
        elif name in _entry_points():
            backend = _instantiate(_entry_points()[name].load(), name)
        else:
            raise BackendNotFoundError(
                f"no kvquant backend named {name!r}; available: {', '.join(available_backends())}"
            )
        _loaded[name] = backend
        return backend


def register_backend(name: str, backend: Any) -> None:
    """Register a backend object at run time (tests, notebooks, unpublished kernels)."""
    with _lock:
        _loaded[name] = _instantiate(backend, name)
        _by_type.clear()


def _refuse_while_torch_compiles(kind: type) -> None:
    """torch.compile cannot trace an import, so the first dispatch must happen eagerly."""
    torch = sys.modules.get("torch")
    if torch is not None and "torch" not in _loaded and torch.compiler.is_compiling():
        raise RuntimeError(
            "kvquant's torch backend is not loaded yet and torch.compile cannot trace an import: "
            "call kvquant.get_backend('torch') once before compiling (importing kvquant after torch does it)"
        )


def preload_for_imported_frameworks() -> None:
    """Load the torch backend if torch is already imported (this imports no framework),
    so that a first kvquant call inside torch.compile finds it."""
    if "torch" in sys.modules and "torch" not in _loaded:
        try:
            get_backend("torch")
        except Exception:  # a broken torch install must not break `import kvquant`
            pass


def backend_for(array: Any) -> Any:
    """The backend whose runtime owns ``array``.

    No lock here: torch.compile must be able to trace a dispatch, the registry
    dicts are only ever added to, and a race at worst loads a backend twice.
    """
    kind = type(array)
    cached = _by_type.get(kind)
    if cached is not None:
        return cached
    # Already loaded first: no import, no lock. Built-ins before third-party ones, so a
    # third-party backend that also takes NumPy arrays is used only when asked for by
    # name. Then built-ins whose framework is imported, then entry points.
    # Each stage's names are computed only when it is reached: the first must stay
    # traceable by dynamo, which can follow neither an import nor entry-point discovery.
    stages = (
        lambda: sorted(_loaded, key=lambda n: n not in BUILTIN_BACKENDS),
        lambda: [n for n, (framework, _) in BUILTIN_BACKENDS.items() if framework in sys.modules],
        lambda: list(_entry_points()),
    )
    for stage, names_of in enumerate(stages):
        if stage == 1:
            _refuse_while_torch_compiles(kind)
        for name in names_of():
            if stage and name in _loaded:
                continue
            try:
                backend = get_backend(name)
            except Exception:  # not installed, or a broken third-party package
                continue
            if backend.runtime.is_array(array):
                _by_type[kind] = backend
                return backend
    raise TypeError(
        f"no kvquant backend accepts arrays of type {kind.__module__}.{kind.__name__}; "
        f"available backends: {', '.join(available_backends())}"
    )
