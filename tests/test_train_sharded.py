"""The sharded train step on 8 simulated CPU devices (data, fsdp, tensor and mixed meshes, with
gradient accumulation, ternary QAT) gives the single-device losses and parameters; a checkpoint
restores onto another mesh."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np


def test_meshes_equal_single_device():
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES="8")
    proc = subprocess.run([sys.executable, str(Path(__file__).with_name("sharded_worker.py"))],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    single = out.pop("single")
    assert single["losses"][-1] < single["losses"][0]
    ternary = out.pop("ternary_single")      # ternary QAT: its own single-device reference
    assert ternary["losses"] != single["losses"]
    for name, run in out.items():
        base = ternary if name.startswith("ternary") else single
        np.testing.assert_allclose(run["losses"], base["losses"], rtol=1e-5, err_msg=name)
        for k in single["first"]:
            np.testing.assert_allclose(run["first"][k], base["first"][k], rtol=1e-4, atol=1e-6,
                                       err_msg=f"{name}: {k}")
    assert "fsdp" in out["fsdp8"]["q_spec"] and "tensor" in out["tensor2_fsdp4"]["q_spec"]
    # a checkpoint of the fsdp run restored onto a data x tensor mesh: resharded, same values
    assert out["fsdp8"]["q_spec"].split(" -> ")[1] == "P(None, None, 'tensor', None)"
