"""A minimal third-party kvquant backend, installed through the ``kvquant.backends``
entry point: kvquant's line-by-line transcription of docs/spec.md as its kernels
(kvquant.conformance.transcription; a real backend brings its framework's own), the
argument checks and the seed's method surface borrowed from kvquant.

    pip install ./examples/kvquant-example-backend
    kvquant conformance --backend example
    pytest --kvquant-backend example
"""
from kvquant import BackendOps
from kvquant.backends.numpy.runtime import NumpyRuntime
from kvquant.conformance import transcription


class ExampleRuntime(NumpyRuntime):
    """Host NumPy arrays, like the reference; only the name differs."""

    name = "example"


def create_backend() -> BackendOps:
    return BackendOps("example", ExampleRuntime(), transcription, variant="eager")
