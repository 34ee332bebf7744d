"""`mcpm aot`: the tiny config's sharded train step compiles for a small TPU slice (libtpu's
topology description, no TPU) and reports per-device HBM; a batch that cannot fit exits 1."""
import json
import sys

import pytest

from mcpm.cli import main
from mcpm.config import ConfigError
from mcpm.train.aot import libtpu_topology_name

pytest.importorskip("libtpu", reason="AOT compilation needs libtpu (pip install -e '.[test]')")

SMALL = ["model.num_hidden_layers=2", "model.hidden_size=128", "model.intermediate_size=256"]


def test_slice_names():
    assert libtpu_topology_name("v5p-64") == ("v5p:2x4x4", 95 * 1024 ** 3)
    assert libtpu_topology_name("v5e-256")[0] == "v5e:16x16"
    assert libtpu_topology_name("v4-32")[0] == "v4:2x2x4"
    assert libtpu_topology_name("v5p:4x4x4")[0] == "v5p:4x4x4"
    with pytest.raises(ConfigError, match="unknown slice"):
        libtpu_topology_name("v5p-6")
    with pytest.raises(ConfigError, match="unknown TPU slice"):
        libtpu_topology_name("h100-8")


def test_tiny_compiles_for_v5e_4_and_an_oversized_batch_does_not_fit(tmp_path, capsys):
    report = tmp_path / "r.json"
    rc = main(["aot", "configs/tiny.yaml", "--topology", "v5e-4", "mesh.data=2", "mesh.fsdp=2",
               "--batch-size", "8", "--seq-len", "128", "--json", str(report), *SMALL])
    out = capsys.readouterr().out
    assert rc == 0, out
    r = json.loads(report.read_text())
    assert r["fits"] and r["devices"] == 4 and r["mesh"] == {"data": 2, "fsdp": 2, "tensor": 1}
    assert 0 < r["argument_bytes"] < r["hbm_bytes"] and r["temp_bytes"] > 0
    assert "fits" in out and "TPU v5 lite" in out
    rc = main(["aot", "configs/tiny.yaml", "--topology", "v5e-4", "mesh.data=4",
               "--batch-size", "4096", "--seq-len", "4096", *SMALL])
    out = capsys.readouterr().out
    assert rc == 1 and "DOES NOT FIT" in out, out
    print(out, file=sys.stderr)
