"""kvquant's conformance suite (installed as ``kvquant.conformance``): the case families
(cases.py), golden vectors (vectors.py, vectors/), the runner that compares a backend
with the NumPy reference bit for bit (runner.py, bundles.py, properties.py), the suite
and its profiles (suite.py) and the pytest plugin (plugin.py). docs/conformance.md."""
