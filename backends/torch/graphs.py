"""torch.compile for the kernels: each unit compiled with only the token axis dynamic,
and on the CPU its graphs compiled ahead of time, saved to a private directory and
loaded by later processes (docs/performance.md, "Saved graphs")."""
from __future__ import annotations

import ast
import functools
import hashlib
import os
import platform
import sys
from typing import Optional

import torch

from kvquant import _cache_dir

from . import kernels


# How every kernel is compiled (see compile_unit); benchmarks/bench_quantize.py compiles its
# plain comparison code the same way.
COMPILE_OPTIONS = {"fullgraph": True, "dynamic": False, "options": {"cpp.dynamic_threads": True}}


def compile_unit(fn):
    """torch.compile(fullgraph=True) with only the token dimension dynamic.

    Fully dynamic shapes (dynamic=True) made Inductor's INT4 loops many times slower
    (the group reshape loses its static width), and fully static ones recompile for
    every token count; so shapes are static except dimension 0 of every input.

    Inductor decides whether a CPU loop runs in parallel from the first call's token
    count and keeps that code for every later one, on disk too: a kernel first compiled
    for a few tokens ran serially on 32768 (docs/performance.md). dynamic_threads always emits the parallel
    loop and lets OpenMP pick the thread count per call; a few tokens cost the same.
    The bits cannot depend on it: the reductions are max, min and exact pair sums.

    On the CPU a call is served by a graph saved to disk (_SavedGraphs) where torch
    allows it; Dynamo serves the rest with the same graph.
    """
    compiled = torch.compile(fn, **COMPILE_OPTIONS)
    saved = _SavedGraphs(fn.__name__, compiled)

    def call(*args):
        if torch.compiler.is_compiling():
            return fn(*args)  # inside a caller's torch.compile: one graph with theirs
        if any(isinstance(a, torch.Tensor) and a.numel() == 0 for a in args):
            return fn(*args)  # nothing to compute: not worth a specialisation of its own
        graph = saved.graph_for(args)
        if graph is not None:
            return graph.fn(*args)
        _mark_token_axis(args)
        return compiled(*args)

    return call


def _mark_token_axis(args):
    for a in args:
        if isinstance(a, torch.Tensor) and a.dim() >= 1:
            torch._dynamo.maybe_mark_dynamic(a, 0)


class AheadOfTimeGraph:
    """A function compiled ahead of time (torch.compile's aot_compile): the graph's own
    function and the C++ check of Dynamo's guards, without Dynamo's frame evaluation
    (which re-traces every graph in each new process and costs more per call;
    docs/performance.md). ``closure``: the locals the guards read besides the
    arguments (a closure's cells)."""

    def __init__(self, compiled, args):
        self.fn = compiled.fn
        self.check = compiled._artifacts.guard_manager.check
        self.names = list(compiled._artifacts.signature.parameters)
        self.closure = {k: v for k, v in compiled.prepare_f_locals(*args).items() if k not in self.names}

    def accepts(self, args) -> bool:
        f_locals = dict(self.closure)
        f_locals.update(zip(self.names, args))
        return self.check(f_locals)

    @classmethod
    def compile(cls, dynamo, args, example_args=None, save_to=None) -> Optional["AheadOfTimeGraph"]:
        """``dynamo`` (a torch.compile'd function) compiled for calls like ``args``, or
        None where this torch cannot or the guards refuse ``args`` themselves.
        ``example_args``: what to trace instead (e.g. views marked dynamic); ``save_to``:
        a file to save the graph in, for ``load``."""
        try:
            compiled = dynamo.aot_compile((tuple(args if example_args is None else example_args), {}))
            graph = cls(compiled, args)
            if not graph.accepts(args):
                return None
        except Exception:  # noqa: BLE001 - an older or newer torch: Dynamo serves the call
            return None
        if save_to is not None:
            try:
                with _cache_dir.atomic_path(save_to) as tmp:
                    compiled.save_compiled_function(tmp)
            except Exception:  # noqa: BLE001 - a read-only or full disk: used unsaved
                pass
        return graph

    @classmethod
    def load(cls, path, args) -> Optional["AheadOfTimeGraph"]:
        """The graph saved in ``path``, or None where it cannot be read or its guards
        refuse ``args``."""
        try:
            with open(path, "rb") as f:
                graph = cls(torch.compiler.load_compiled_function(f), args)
            return graph if graph.accepts(args) else None
        except Exception:  # noqa: BLE001 - unreadable, or saved by another torch
            return None


SAVE_COMPILED = True  # False: Dynamo serves every compiled call (tests compare the two)


class _SavedGraphs:
    """One kernel unit's graphs, compiled ahead of time and saved to disk
    (``saved_graphs_dir``), loaded in later processes: a warm process then spends about
    a load per graph instead of Dynamo's re-trace (docs/performance.md).

    Safe because every call is checked against the graph's own guards (dtype, static
    sizes, strides, constant arguments, grad mode, thread count), and the directory is
    named by everything else a graph depends on (torch, Python, the CPU's vector
    instructions, Inductor's configuration, the kernels' source files): a call the
    guards refuse is compiled anew (or, within a process, served by Dynamo), and a
    change to those files compiles everything anew. CPU only: on an accelerator Dynamo
    serves every call. The file name is a hash of what the guards check
    (_specialisation), so a process loads only the graphs it calls."""

    def __init__(self, name, dynamo):
        self.name, self.dynamo = name, dynamo
        self.graphs = {}
        SAVED_UNITS.append(self)

    def graph_for(self, args) -> Optional[AheadOfTimeGraph]:
        if not SAVE_COMPILED or not all(a.device.type == "cpu" for a in args if isinstance(a, torch.Tensor)):
            return None
        key = _specialisation(args)
        graph = self.graphs.get(key, False)
        if graph is False:
            graph = self.graphs[key] = self._load_or_compile(key, args)
        # A call its guards refuse (a specialisation the key does not tell apart, e.g.
        # aliased arguments) goes to Dynamo, which keeps its own specialisations.
        return graph if graph is not None and graph.accepts(args) else None

    def _load_or_compile(self, key, args) -> Optional[AheadOfTimeGraph]:
        directory = saved_graphs_dir()
        if directory is None:
            return None
        path = os.path.join(directory, f"{self.name}-{hashlib.sha256(repr(key).encode()).hexdigest()[:20]}.pt2")
        graph = AheadOfTimeGraph.load(path, args) if _cache_dir.loadable(path, "a saved torch graph") else None
        if graph is None:
            # Traced on views marked dynamic: the caller's tensors keep no marking.
            views = [a.view(a.shape) if isinstance(a, torch.Tensor) else a for a in args]
            _mark_token_axis(views)
            graph = AheadOfTimeGraph.compile(self.dynamo, args, views, save_to=path)
        return graph


SAVED_UNITS: list = []


def _specialisation(args) -> tuple:
    """What a call's graph is specialised on, as the guards check it: per tensor its
    dtype, sizes but the token count's (apart from 0/1, which Dynamo specialises),
    strides and autograd state; the other arguments' values; the process's grad mode,
    inference mode and thread count."""
    parts = [torch.is_grad_enabled(), torch.is_inference_mode_enabled(), torch.get_num_threads()]
    for a in args:
        if isinstance(a, torch.Tensor):
            parts.append((str(a.dtype), a.dim() and min(a.shape[0], 2), tuple(a.shape[1:]),
                          "c" if a.is_contiguous() else tuple(a.stride()), a.requires_grad, a.is_inference()))
        else:
            parts.append((type(a).__name__, repr(a)))
    return tuple(parts)


def _kernel_sources() -> list:
    """The files a kernel graph can depend on: kernels.py and the kvquant modules it
    imports at module level, transitively (a graph reads their functions and
    constants). A change anywhere else in kvquant (the cache, the command, attention)
    leaves the saved graphs valid."""
    import kvquant  # here, not at the top: the walk below would count the package's own imports

    backends = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    roots = {"kvquant": os.path.dirname(kvquant.__file__), "kvquant.backends": backends,
             "kvquant.backends.torch": os.path.dirname(os.path.abspath(__file__))}

    def file_of(module: str):
        for prefix in sorted(roots, key=len, reverse=True):
            if module == prefix or module.startswith(prefix + "."):
                base = os.path.join(roots[prefix], *module[len(prefix) + 1:].split(".")) if module != prefix else roots[prefix]
                for candidate in (base + ".py", os.path.join(base, "__init__.py")):
                    if os.path.isfile(candidate):
                        return candidate
        return None

    def package_of(path: str) -> str:
        for prefix, root in roots.items():
            if os.path.dirname(path) == root:
                return prefix
        return ""

    seen, todo = [], [os.path.abspath(kernels.__file__)]
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.append(path)
        with open(path, "rb") as f:
            tree = ast.parse(f.read())
        for node in tree.body:
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                module = node.module or ""
                if node.level:
                    module = ".".join(filter(None, [package_of(path), module]))
                # A name that is a submodule is that module's file; any other name is
                # defined in the module imported from.
                targets = [f"{module}.{a.name}" if file_of(f"{module}.{a.name}") else module for a in node.names]
            else:
                continue
            todo += [f for f in map(file_of, targets) if f is not None]
    return sorted(seen)


GRAPH_DIRS_KEPT = 3  # hash directories kept under the root, the current one included


@functools.lru_cache(maxsize=None)
def saved_graphs_dir() -> Optional[str]:
    """Where this process's graphs are saved: under KVQUANT_TORCH_GRAPHS_DIR (empty or
    "0": saved nowhere) or ~/.cache/kvquant/torch-graphs, a directory named by the hash
    of everything a graph depends on beyond its guards (torch, Python, the CPU, Inductor's
    settings, the kernels' source files). The root must be private to this user
    (kvquant/_cache_dir.py); of the hash directories kvquant made there, all but the
    GRAPH_DIRS_KEPT most recently used are removed, and nothing else is touched."""
    root = os.environ.get("KVQUANT_TORCH_GRAPHS_DIR")
    if root is not None and root.strip() in ("", "0"):
        return None
    digest = hashlib.sha256()
    try:
        import torch._inductor.config as inductor_config

        torch.compiler.load_compiled_function  # noqa: B018 - a torch without it saves nothing
        for part in (torch.__version__, sys.version, platform.machine(), torch.backends.cpu.get_cpu_capability(),
                     repr(COMPILE_OPTIONS), repr(sorted(inductor_config.save_config_portable().items(), key=str))):
            digest.update(part.encode() + b"\0")
    except (AttributeError, ImportError):
        return None
    for path in _kernel_sources():
        with open(path, "rb") as f:
            digest.update(os.path.basename(path).encode() + b"\0" + f.read())
    root = _cache_dir.cache_dir("torch-graphs") if root is None else _cache_dir.private_dir(root, "saved torch graphs")
    if root is None:
        return None
    try:
        directory = _cache_dir.owned_subdir(root, digest.hexdigest()[:24])
        os.utime(directory)
    except OSError:
        return None
    if _cache_dir.why_not_private(directory) is not None:
        return None
    _cache_dir.prune_owned(root, GRAPH_DIRS_KEPT, "[0-9a-f]{24}")
    return directory
