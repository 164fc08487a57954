"""The README matches the code: CI runs its test command, its error table (and
docs/formats.md's) is what the library measures, its quickstart snippets run, it stays
a front door (at most about 150 lines) and its links lead somewhere."""
import re
from pathlib import Path

import numpy as np
import pytest

import kvquant

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def bash_blocks():
    return re.findall(r"```bash\n(.*?)```", README, re.S)


def test_ci_runs_exactly_the_readme_test_command():
    test_command = next(b for b in bash_blocks() if "pytest" in b).strip()
    assert "pytest" in test_command
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert test_command in ci_lines


def test_main_command_runs_the_conformance_suite():
    main = [b for b in bash_blocks() if b.strip().startswith("python3 -m venv")]
    assert main[0].strip().endswith("kvquant conformance")  # the first of the two commands


ROWS = {
    "FP8 E4M3, per token": ("fp8", {}),
    "FP8 E4M3, per tensor": ("fp8_per_tensor", {}),
    "INT8, per token, symmetric": ("int8", {}),
    "INT4, groups of 32, asymmetric": ("int4", {"group_size": 32}),
    "INT4, groups of 64 (default)": ("int4", {"group_size": 64}),
    "INT4, groups of 128": ("int4", {"group_size": 128}),
    "INT2, groups of 32 (v1.1)": ("int2", {"group_size": 32}),
    "INT2, groups of 64 (v1.1)": ("int2", {}),
    "INT4 per channel, blocks of 32 tokens (v1.1)": ("int4_per_channel", {"group_size": 32}),
    "INT4 per channel, blocks of 64 tokens (v1.1)": ("int4_per_channel", {}),
    "INT2 per channel, blocks of 32 tokens (v1.1)": ("int2_per_channel", {"group_size": 32}),
}
KEY_ROWS = {
    "INT4, groups of 32 inside a token": ("int4", {"group_size": 32}),
    "INT4 per channel, blocks of 32 tokens": ("int4_per_channel", {"group_size": 32}),
}


FORMATS_PAGE = (ROOT / "docs" / "formats.md").read_text()


@pytest.mark.parametrize("row", sorted(KEY_ROWS))
def test_outlier_key_table_matches_library(row):
    fmt, kw = KEY_ROWS[row]
    line = next(text for text in FORMATS_PAGE.splitlines() if text.startswith(f"| {row} |"))
    printed = line.strip("| ").split("|")[-1].strip()
    rng = np.random.default_rng(1)
    k = rng.standard_normal((4096, 128)).astype(np.float32)
    k[:, rng.choice(128, 4, replace=False)] *= np.float32(40)
    y = kvquant.dequantize(kvquant.quantize(k, fmt, **kw), "float32")
    assert printed == f"{np.linalg.norm(y - k) / np.linalg.norm(k):.2e}"


def test_format_table_bits_per_element_match_the_format_table():
    from kvquant._formats import format_info

    for row, (fmt, kw) in ROWS.items():
        line = next(text for text in README.splitlines() if text.startswith(f"| {row} |"))
        printed = float(line.strip("| ").split("|")[2].strip())
        assert printed == format_info(fmt).bits_per_element(128, kw.get("group_size", 64)), row


@pytest.mark.parametrize("row", sorted(ROWS))
def test_format_table_error_matches_library(row):
    fmt, kw = ROWS[row]
    line = next(text for text in README.splitlines() if text.startswith(f"| {row} |"))
    printed = line.strip("| ").split("|")[-1].strip()
    x = np.random.default_rng(0).standard_normal((4096, 128)).astype(np.float32)
    y = kvquant.dequantize(kvquant.quantize(x, fmt, **kw), "float32")
    assert printed == f"{np.linalg.norm(y - x) / np.linalg.norm(x):.2e}"


def python_blocks():
    return re.findall(r"```python\n(.*?)```", README, re.S)


def test_numpy_quickstart_runs():
    scope = {}
    exec(python_blocks()[0], scope)
    assert scope["k_hat"].shape == scope["k"].shape and scope["k_hat"].dtype == np.float32


def test_torch_quickstart_runs():
    torch = pytest.importorskip("torch")
    code = python_blocks()[1]
    if not torch.cuda.is_available():
        code = code.replace('device="cuda"', 'device="cpu"')
    scope = {}
    exec(code, scope)
    assert scope["k_hat"].dtype == torch.bfloat16 and scope["q"].codes.dtype == torch.float8_e4m3fn
    assert scope["step"](scope["k"]).dtype == torch.int8


def test_jax_quickstart_runs():
    pytest.importorskip("jax")
    scope = {}
    exec(python_blocks()[2], scope)
    assert scope["k_hat"].dtype == scope["k"].dtype and scope["k_hat"].shape == scope["k"].shape


def test_cache_snippet_runs():
    rng = np.random.default_rng(0)
    scope = {"k_new": rng.standard_normal((1, 2, 200, 64)).astype(np.float32),
             "v_new": rng.standard_normal((1, 2, 200, 64)).astype(np.float32)}
    exec(python_blocks()[3], scope)
    assert scope["k_all"].shape == scope["k_new"].shape
    assert scope["cache"].quantized("keys").shape[2] == 200 - 128


def test_transformers_snippet_runs():
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=128, hidden_size=128, intermediate_size=256, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1, head_dim=64)
    scope = {"model": transformers.LlamaForCausalLM(config).eval(), "ids": torch.randint(0, 128, (1, 8))}
    with torch.no_grad():
        exec(python_blocks()[4], scope)
    assert scope["out"].shape[1] > 8 and scope["cache"].get_seq_length() == scope["out"].shape[1] - 1


@pytest.mark.parametrize("page", ["README.md"] + sorted(p.name for p in (ROOT / "docs").glob("*.md")))
def test_markdown_tables_have_one_row_per_line(page):
    # A table pasted from a Python repr keeps its "\n" escapes and renders as one line
    # of pipes; docs/attention.md's benchmark tables did.
    path = ROOT / page if page == "README.md" else ROOT / "docs" / page
    bad = [n for n, line in enumerate(path.read_text().splitlines(), 1) if line.startswith("|") and "|\\n|" in line]
    assert not bad, f"{page}: table rows joined by a literal \\n on lines {bad}"


def test_readme_is_a_front_door():
    assert len(README.splitlines()) <= 155


@pytest.mark.parametrize("page", ["README.md"] + sorted(p.name for p in (ROOT / "docs").glob("*.md")))
def test_relative_links_lead_to_files_and_headings(page):
    path = ROOT / page if page == "README.md" else ROOT / "docs" / page
    text = path.read_text()
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if "://" in target:
            continue
        file, _, anchor = target.partition("#")
        linked = (path.parent / file).resolve() if file else path
        assert linked.exists(), f"{page}: link to missing {target}"
        if anchor and linked.suffix == ".md":
            slugs = {re.sub(r"[^a-z0-9 _-]", "", h.strip().lower()).replace(" ", "-")
                     for h in re.findall(r"^#+ (.*)$", linked.read_text(), re.M)}
            assert anchor in slugs, f"{page}: no heading #{anchor} in {file or page}"
