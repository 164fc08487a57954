"""`import kvquant` stays light: NumPy (and ml_dtypes) only, proven in a fresh interpreter."""
import json
import subprocess
import sys

import pytest

FRAMEWORKS = ("torch", "jax", "jaxlib", "tensorflow", "transformers")
TEST_TOOLS = ("hypothesis", "pytest")


@pytest.mark.parametrize("module", ["kvquant", "kvquant.backends", "kvquant.conformance", "kvquant.conformance.plugin", "kvquant.cli",
                                    "kvquant.cache", "kvquant.integrations"])
def test_import_pulls_in_no_framework(module):
    # The pytest plugin is loaded by pytest itself, so only it may import pytest.
    banned = FRAMEWORKS + (() if module.endswith("plugin") else TEST_TOOLS)
    code = f"import sys, json, {module}; print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in {banned!r})))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == [], f"importing {module} imported {out.stdout}"


def test_dispatching_a_numpy_array_imports_no_framework():
    code = (
        "import sys, numpy as np, kvquant; q = kvquant.quantize(np.ones((2, 64), np.float32), 'int4');"
        "kvquant.dequantize(q); print(any(m in sys.modules for m in ('torch', 'jax')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_installed_names_are_namespaced():
    import kvquant.backends.numpy.kernels as ref
    import kvquant.conformance.runner as runner

    assert ref.__name__ == "kvquant.backends.numpy.kernels"
    assert runner.__name__ == "kvquant.conformance.runner"
    code = "import importlib.util as u; print(u.find_spec('backends'), u.find_spec('conformance'))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd="/")
    assert out.stdout.strip() == "None None"


def test_wheel_ships_namespaced_packages_and_vectors(tmp_path):
    import zipfile
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(tmp_path), str(root)],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    (wheel,) = tmp_path.glob("kvquant_bitexact-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")} == {"kvquant"}
    for required in ("kvquant/backends/numpy/kernels.py", "kvquant/backends/torch/kernels.py", "kvquant/backends/jax/kernels.py",
                     "kvquant/backends/torch/attention.py", "kvquant/backends/cpu_kernel/decode_attention.cpp",
                     "kvquant/conformance/plugin.py", "kvquant/conformance/vectors/kvquant-v1.json"):
        assert required in names


def test_the_core_never_imports_a_backend():
    """kvquant's core (every module under kvquant/ but the integrations, the top layer)
    reaches backends only through the registry and the runtimes, never by importing
    them: so no module under backends/ imports a kvquant module that imports it back.
    Attention is the backends' own (Runtime.attend), not an if-chain here."""
    import ast
    import pathlib

    core = pathlib.Path(__file__).resolve().parents[1] / "kvquant"
    offenders = []
    paths = [p for p in sorted(core.rglob("*.py")) if "integrations" not in p.parts]
    assert core / "cache" / "layer.py" in paths  # the walk reaches subpackages
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                module = node.module or ""
                names = [("." * node.level) + module] + [f"{'.' * node.level}{module}.{a.name}".replace("..", ".")
                                                         for a in node.names]
            if any(n.lstrip(".").startswith(("backends", "kvquant.backends")) for n in names):
                offenders.append(f"{path.relative_to(core)}:{node.lineno}")
    assert offenders == []
