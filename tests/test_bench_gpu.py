"""experiments/bench_gpu.py in its smoke mode (tiny shapes on this CPU): every cell runs and is
reported, so the script is ready for the few minutes of a lent GPU. No timing is checked."""
import importlib.util
import json
import sys

from conftest import OFFICIAL, REPO


def test_every_cell_runs_and_is_saved(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_gpu", REPO / "experiments" / "bench_gpu.py")
    bench = importlib.util.module_from_spec(spec)
    sys.modules["bench_gpu"] = bench          # its dataclasses look their module up
    spec.loader.exec_module(bench)
    out = tmp_path / "bench_gpu.md"
    assert bench.main(["--smoke", "--out", str(out), "--fixtures", str(OFFICIAL)]) == 0
    report = json.loads(out.with_suffix(".json").read_text())
    for cell in bench.CELLS:
        assert cell in report and "error" not in report[cell], (cell, report.get(cell))
    if OFFICIAL.is_dir():
        for errors in report["fixtures"].values():
            assert errors["highest"] < 2e-6
    assert [r["impl"] for r in report["attention"][:3]] == ["mcpm auto", "mcpm flash",
                                                             "jax cudnn"]
    assert "error" in report["attention"][2]          # cuDNN needs a GPU
    assert all("fwd_bwd_s" in r for r in report["attention"] if r["impl"] != "jax cudnn")
    text = out.read_text()
    assert "## train" in text and "tokens/s" in text and "not run" not in text
