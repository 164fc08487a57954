"""kvquant past one CPU device (docs/cache.md, "More than one device"): a JaxLayerCache
sharded on a mesh of 8 virtual CPU devices, and KvquantCache in a transformers model
run tensor-parallel by 2 processes (gloo). Each runs in subprocesses, so that neither
XLA's device-count flag nor torch.distributed leaks into the rest of the suite."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import assert_same_bits
from test_attention import BOUND

HERE = os.path.dirname(__file__)


def test_jax_cache_on_a_mesh_keeps_sharding_and_bits_with_no_collective():
    pytest.importorskip("jax")
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, os.path.join(HERE, "jax_mesh_check.py")], capture_output=True, text=True,
                         env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout)
    said = report["refusals"]
    assert "splits the token or head_dim axis" in said["tokens split"]
    assert said["kv_heads 6 over 4 devices"] == "ValueError: kv_heads 6 cannot be split over mesh axes heads (4 devices)"
    assert said["not a NamedSharding"].startswith("TypeError: sharding must be a jax.sharding.NamedSharding, got ")
    report = report["rows"]
    assert {(r["layout"], r["formats"]) for r in report} == {
        (layout, formats) for layout in ("kv_heads", "batch", "batch_and_kv_heads")
        for formats in ("int8+int4", "fp8+int2", "fp8_per_tensor+none", "kivi+int8")}
    for row in report:
        where = f"{row['formats']} sharded over {row['layout']}"
        assert row["cache_sharding_kept"] and row["history_sharding_kept"], f"{where}: an array left its placement"
        assert row["same_bits"] and row["same_history_bits"], f"{where}: bits differ from the one-device cache"
        assert row["attention_sharding_kept"], f"{where}: attention's output left the query's placement"
        assert row["attention_collectives"] == {}, f"{where}: attention gathers ({row['attention_collectives']})"
        assert row["attention_error_over_max_v"] <= BOUND, where
        if row["formats"].startswith("fp8_per_tensor"):
            # The spec poisons a whole per-tensor record for one NaN: a scalar max per append
            # (over each mesh axis).
            assert list(row["append_collectives"]) == ["all-reduce"], where
            assert row["append_collectives"]["all-reduce"] <= row["appends"] * row["mesh_axes"], where
        else:
            assert row["append_collectives"] == {}, f"{where}: append communicates ({row['append_collectives']})"


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=256, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                                      max_position_embeddings=512)
    path = tmp_path_factory.mktemp("tiny-llama")
    transformers.LlamaForCausalLM(config).save_pretrained(path)
    return path


def test_tensor_parallel_generation_keeps_each_ranks_heads_and_tokens(tiny_llama, tmp_path):
    pytest.importorskip("accelerate")  # transformers' tp_plan needs it (the test extra installs it)
    import torch
    import transformers

    import kvquant
    import torch_tp_check

    one_process = torch_tp_check.generate_with_each_cache(
        transformers.AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval())
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          os.path.join(HERE, "torch_tp_check.py"), str(tiny_llama), str(tmp_path)],
                         capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-4000:]
    for rank in range(2):
        report = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert report["world"] == 2 and report["k_proj_weight"] == "DTensor", "the model was not tensor-parallel"
        for name, got in report["caches"].items():
            want = one_process[name]
            where = f"rank {rank}, {name}"
            assert got["tokens"] == want["tokens"], f"{where}: greedy tokens differ from one process's"
            assert got["kvquant_attention_calls"] == want["kvquant_attention_calls"] == 2 * torch_tp_check.NEW_TOKENS
            for index, (layer, alone) in enumerate(zip(got["layers"], want["layers"])):
                here = f"{where}, layer {index}"
                assert layer["handed_types"] == ["Tensor"], f"{here}: {layer['handed_types']} reached kvquant"
                assert (layer["kv_heads_held"], alone["kv_heads_held"]) == (1, 2), f"{here}: not its own head"
                if layer["stored_key_codes"] is None:
                    continue
                # One device's bits: the codes are kvquant.quantize of the keys this rank was handed.
                keys = np.concatenate([np.asarray(k, np.float32) for k in layer["keys_handed"]], axis=2)
                ref = kvquant.quantize(keys, "int4", group_size=32)
                assert_same_bits(ref.codes, np.asarray(layer["stored_key_codes"], np.uint8), f"{here} codes")
                assert_same_bits(ref.scales.view(np.int32), np.asarray(layer["stored_key_scales"], np.int32), here)
                assert_same_bits(ref.zeros.view(np.int32), np.asarray(layer["stored_key_zeros"], np.int32), here)
                if index == 0:
                    # Layer 0's keys are the one-process keys of this rank's head (later layers'
                    # inputs went through the model's all-reduce, which sums in another order).
                    alone_codes = np.asarray(alone["stored_key_codes"], np.uint8)[:, rank:rank + 1]
                    assert_same_bits(alone_codes, np.asarray(layer["stored_key_codes"], np.uint8), f"{here} vs one")
