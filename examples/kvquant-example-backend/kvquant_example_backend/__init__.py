"""A minimal third-party kvquant backend, installed through the ``kvquant.backends``
entry point: kernels written from docs/spec.md alone (kernels.py), argument checks
and the seed's method surface borrowed from kvquant.

    pip install ./examples/kvquant-example-backend
    kvquant conformance --backend example
    pytest --kvquant-backend example
"""
from kvquant import BackendOps
from kvquant.backends.numpy.runtime import NumpyRuntime

from . import kernels


class ExampleRuntime(NumpyRuntime):
    """Host NumPy arrays, like the reference; only the name differs."""

    name = "example"


def create_backend() -> BackendOps:
    return BackendOps("example", ExampleRuntime(), kernels, variant="eager")
