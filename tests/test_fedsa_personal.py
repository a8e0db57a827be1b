"""FedSA: each node saves its personal adapter (final global A + own B) at the end of the run
(issue 20, defect 4). The real strategy and ClientApp, in process."""

from __future__ import annotations

import json

import numpy as np
from fl_harness import run_rounds, tiny_config

from fedlora.learning import lora


def test_every_node_saves_global_a_and_its_own_b_in_peft_format(tmp_path):
    import safetensors.numpy

    _, _, glob, _ = run_rounds(tiny_config(strategy="fedsa", num_server_rounds=2), num_nodes=3,
                               node_extra=lambda i: {"personal-adapter-dir": str(tmp_path)})
    final = glob.arrays_for(8)
    bs = []
    for pid in range(3):
        directory = tmp_path / str(pid)
        meta = json.loads((directory / "fedlora.json").read_text())
        assert meta["own_b"] is True and meta["server_round"] == 2 and meta["partition_id"] == pid
        assert (directory / "adapter_config.json").exists()
        saved = safetensors.numpy.load_file(directory / "adapter_model.safetensors")
        a_keys = [k for k in saved if k.endswith("lora_A.weight")]
        b_keys = [k for k in saved if k.endswith("lora_B.weight")]
        assert a_keys and b_keys
        for key in a_keys:  # the final global A
            module = key[: -len("lora_A.weight")]
            match = [k for k in final if k.endswith(lora.LORA_A) and module.rstrip(".") in k]
            np.testing.assert_array_equal(saved[key], final[match[0]])
        bs.append(np.concatenate([saved[k].ravel() for k in sorted(b_keys)]))
    server_b = np.concatenate([final[k].ravel() for k in sorted(final)
                               if k.endswith(lora.LORA_B)])
    assert not server_b.any()  # the server never sees B: its own is the initial zero
    assert all(np.abs(b).max() > 0 for b in bs)  # each node's B was trained
    assert not np.array_equal(bs[0], bs[1])  # ... and is its own


def test_without_a_directory_nothing_is_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run_rounds(tiny_config(strategy="fedsa", num_server_rounds=1), num_nodes=2)
    assert not any(tmp_path.rglob("adapter_config.json"))
