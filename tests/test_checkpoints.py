"""Run checkpoints: keep policy, data-iterator state, corrupt-latest fallback, resharding."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mcpm.train.checkpoints import RunCheckpoints


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


def test_corrupt_latest_falls_back_with_a_warning(tmp_path):
    ck = RunCheckpoints(tmp_path, keep_last=3)
    for step in (1, 2):
        ck.save(step, state_at(step), {}, data_state={"pos": step})
    ck.close()
    for f in (tmp_path / "checkpoints" / "2" / "state").rglob("*"):
        if f.is_file() and f.name != "commit_success.txt":
            f.write_bytes(b"garbage")
    ck = RunCheckpoints(tmp_path, keep_last=3)
    with pytest.warns(UserWarning, match="could not be restored"):
        step, state, _, data = ck.restore(abstract(state_at(0)))
    assert step == 1 and data == {"pos": 1}
    np.testing.assert_array_equal(np.asarray(state["params"]["q"]),
                                  np.asarray(state_at(1)["params"]["q"]))
    ck.close()


def test_nothing_to_restore(tmp_path):
    ck = RunCheckpoints(tmp_path)
    assert ck.restore(abstract(state_at(0))) is None
    ck.close()
