"""Run checkpoints: keep policy, data-iterator state, damaged-latest fallback and quarantine,
mismatch and missing-data-state refusals."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mcpm.train.checkpoints import (CheckpointMismatchError, MissingDataStateError,
                                    NoRestorableCheckpointError, RunCheckpoints)


def state_at(step):
    rng = np.random.default_rng(step)
    return {"step": jnp.asarray(step, jnp.int32),
            "params": {"q": jnp.asarray(rng.standard_normal((4, 8)), jnp.float32)}}


def abstract(state):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                        state)


def test_keep_last_and_every_kth_with_data_state(tmp_path):
    ck = RunCheckpoints(tmp_path, keep_last=2, keep_every=4)
    for step in range(1, 8):
        ck.save(step, state_at(step), {"seed": 3}, data_state={"pos": step, "raw": b"\x00\xff"})
    ck.wait()
    assert ck.steps() == [4, 6, 7]
    step, state, config, data = ck.restore(abstract(state_at(0)))
    assert step == 7 and config == {"seed": 3} and data == {"pos": 7, "raw": b"\x00\xff"}
    np.testing.assert_array_equal(np.asarray(state["params"]["q"]),
                                  np.asarray(state_at(7)["params"]["q"]))
    assert ck.restore(abstract(state_at(0)), step=4)[3]["pos"] == 4
    with pytest.raises(FileNotFoundError, match="have: \\[4, 6, 7\\]"):
        ck.restore(abstract(state_at(0)), step=5)
    ck.close()


def saved(tmp_path, steps=(1, 2), keep_last=3):
    ck = RunCheckpoints(tmp_path, keep_last=keep_last)
    for step in steps:
        ck.save(step, state_at(step), {}, data_state={"pos": step})
    ck.close()
    return tmp_path / "checkpoints"


def tree(path):
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


def test_damaged_latest_falls_back_then_is_quarantined_and_its_step_saved_again(tmp_path):
    root = saved(tmp_path)
    for f in (root / "2" / "state").rglob("*"):
        if f.is_file() and f.name != "commit_success.txt":
            f.write_bytes(b"garbage")
    before = tree(tmp_path)
    ck = RunCheckpoints(tmp_path, keep_last=3, create=False)
    step, state, _, data = ck.restore(abstract(state_at(0)))
    assert step == 1 and data == {"pos": 1} and [s for s, _ in ck.damaged] == [2]
    np.testing.assert_array_equal(np.asarray(state["params"]["q"]),
                                  np.asarray(state_at(1)["params"]["q"]))
    assert tree(tmp_path) == before          # restoring changes nothing on disk
    (line,) = ck.quarantine_damaged()
    assert "step 2 could not be restored" in line and "quarantine" in line
    ck.close()
    (moved,) = (tmp_path / "quarantine").iterdir()
    assert (moved / "checkpoint" / "state").is_dir() and (moved / "data" / "process_0.json").exists()
    ck = RunCheckpoints(tmp_path, keep_last=3)
    assert ck.steps() == [1]
    ck.save(2, state_at(2), {}, data_state={"pos": 2})      # the step is free again
    ck.wait()
    assert ck.restore(abstract(state_at(0)))[0] == 2
    ck.close()


def test_every_step_damaged_refuses_and_moves_nothing(tmp_path):
    root = saved(tmp_path)
    for step in (1, 2):
        (root / "data" / str(step) / "process_0.json").write_text("{not json")
    before = tree(tmp_path)
    ck = RunCheckpoints(tmp_path, create=False)
    with pytest.raises(NoRestorableCheckpointError, match=r"(?s)step 2: JSONDecodeError.*step 1: "
                                                          r"JSONDecodeError.*Nothing was changed"):
        ck.restore(abstract(state_at(0)))
    assert tree(tmp_path) == before


def test_another_state_shape_is_a_mismatch_not_damage(tmp_path):
    saved(tmp_path)
    other = {"step": jnp.asarray(0, jnp.int32), "params": {"q": jnp.zeros((4, 9), jnp.float32)}}
    ck = RunCheckpoints(tmp_path, create=False)
    with pytest.raises(CheckpointMismatchError,
                       match=r"params/q: stored \(4, 8\) float32, expected \(4, 9\) float32"):
        ck.restore(abstract(other))
    assert ck.damaged == [] and not (tmp_path / "quarantine").exists()


def test_missing_data_state_refuses_unless_the_data_may_restart(tmp_path):
    root = saved(tmp_path)
    (root / "data" / "2" / "process_0.json").unlink()
    ck = RunCheckpoints(tmp_path, create=False)
    with pytest.raises(MissingDataStateError, match="process_0.json is missing.*--restart-data"):
        ck.restore(abstract(state_at(0)))
    with pytest.warns(UserWarning, match="restarts from its beginning"):
        step, _, _, data = ck.restore(abstract(state_at(0)), allow_missing_data_state=True)
    assert step == 2 and data is None


def test_opening_without_create_writes_nothing(tmp_path):
    ck = RunCheckpoints(tmp_path / "run", create=False)
    assert ck.steps() == [] and ck.restore(abstract(state_at(0))) is None
    ck.close()
    assert not (tmp_path / "run").exists()


def test_nothing_to_restore(tmp_path):
    ck = RunCheckpoints(tmp_path)
    assert ck.restore(abstract(state_at(0))) is None
    ck.close()
