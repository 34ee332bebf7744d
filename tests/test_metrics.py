"""metrics.jsonl rows, TensorBoard event records and the loss plot."""
import json
import struct

from mcpm.train.metrics import MetricsWriter, plot_metrics, read_metrics


def tb_scalars(directory):
    """(tag, step, value) from tensorboardX event files, read with the TFRecord framing."""
    from tensorboardX.proto import event_pb2
    out = []
    for f in sorted(directory.glob("events.out.tfevents.*")):
        data = f.read_bytes()
        i = 0
        while i < len(data):
            (n,) = struct.unpack("<Q", data[i:i + 8])
            ev = event_pb2.Event.FromString(data[i + 12:i + 12 + n])
            i += 12 + n + 4
            for v in ev.summary.value:
                out.append((v.tag, ev.step, v.simple_value))
    return out


def test_rows_tensorboard_and_plot(tmp_path):
    w = MetricsWriter(tmp_path)
    for step in range(1, 6):
        w.write(step, {"loss": 5.0 / step, "lr": 1e-3 * step, "finite": True,
                       "grad_norm": float("nan") if step == 3 else 1.0})
    w.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "loss"')  # a run killed mid-write
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    assert rows[2]["grad_norm"] is None and rows[1]["loss"] == 2.5
    json.dumps(rows)  # strict JSON: no NaN tokens
    scalars = tb_scalars(tmp_path / "tensorboard")
    assert ("train/loss", 4, 1.25) in scalars
    png = plot_metrics(tmp_path / "metrics.jsonl", tmp_path / "loss.png", "tiny")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
