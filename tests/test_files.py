"""mcpm._files: an output is replaced whole or not at all."""
import json

import pytest

from mcpm._files import atomic_write, write_json, write_jsonl


def test_a_failed_write_leaves_the_old_file_and_no_debris(tmp_path):
    path = write_json(tmp_path / "out.json", {"a": 1})

    def half(tmp):
        tmp.write_text('{"a": ')
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError):
        atomic_write(path, half)
    assert json.loads(path.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]
    write_jsonl(tmp_path / "sub" / "rows.jsonl", [{"x": 1}, {"x": 2}])
    assert (tmp_path / "sub" / "rows.jsonl").read_text() == '{"x": 1}\n{"x": 2}\n'
