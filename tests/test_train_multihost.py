"""Two local processes (jax.distributed, gloo collectives on 127.0.0.1) train exactly like one
process holding the same two devices."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np

from mcpm.train.metrics import read_metrics

WORKER = str(Path(__file__).with_name("multihost_worker.py"))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_equal_one(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES="1")
    port = free_port()
    procs = [subprocess.Popen([sys.executable, WORKER, str(i), "2", str(port),
                               str(tmp_path / "two"), "mesh.data=-1"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for i in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    summaries = [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]
    assert [s["devices"] for s in summaries] == [2, 2]
    one = subprocess.run([sys.executable, WORKER, "0", "1", "0", str(tmp_path / "one"),
                          "mesh.data=-1"], capture_output=True, text=True, timeout=600,
                         env=dict(env, JAX_NUM_CPU_DEVICES="2"))
    assert one.returncode == 0, one.stderr[-3000:]
    assert json.loads(one.stdout.strip().splitlines()[-1])["devices"] == 2
    two_losses = [r["loss"] for r in read_metrics(tmp_path / "two" / "metrics.jsonl")]
    one_losses = [r["loss"] for r in read_metrics(tmp_path / "one" / "metrics.jsonl")]
    assert len(one_losses) == 3
    np.testing.assert_allclose(two_losses, one_losses, rtol=1e-6)
    assert summaries[0]["checkpoints"] == [2, 3]
