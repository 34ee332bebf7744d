"""Run by tests/test_train_sharded.py in a process with 8 CPU devices: the same train steps on
one device and on several meshes; prints one JSON line of losses and the first parameter
values of each tensor after the steps."""
import json
import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["JAX_NUM_CPU_DEVICES"] = "8"

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from mcpm.config import (MeshConfig, ModelConfig, OptimizerConfig, QuantConfig,  # noqa: E402
                         ScheduleConfig)
from mcpm.model import MiniCPM4  # noqa: E402
from mcpm.sharding import (activation_rules, batch_sharding, make_mesh,  # noqa: E402
                           state_shardings)
from mcpm.train.optimizer import make_optimizer  # noqa: E402
from mcpm.train.schedule import wsd_schedule  # noqa: E402
from mcpm.train.step import init_state, make_train_step  # noqa: E402

MODEL = ModelConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, dim_model_base=16,
                    eos_token_id=(2,), tie_word_embeddings=False)
SCHED = ScheduleConfig(peak_lr=1e-2, warmup_steps=1, decay_fraction=0.5)


def batches(n, b=8, t=16):
    rng = np.random.default_rng(0)
    for _ in range(n):
        ids = rng.integers(3, 128, (b, t + 1))
        seg = np.ones((b, t), np.int32)
        seg[::3, 10:] = 2
        pos = np.where(seg == 2, np.arange(t) - 10, np.arange(t)).astype(np.int32)
        w = (seg != 0).astype(np.float32)
        w[::3, 9] = 0
        yield {"inputs": ids[:, :-1].astype(np.int32), "targets": ids[:, 1:].astype(np.int32),
               "weights": w, "positions": pos, "segment_ids": seg}


def run(mesh_cfg, devices, accum=1, steps=2, reshard_to=None, quant=None):
    params = nnx.to_pure_dict(nnx.state(MiniCPM4(MODEL, rngs=nnx.Rngs(0)), nnx.Param))
    tx = make_optimizer(params, MODEL, OptimizerConfig(), SCHED, total_steps=steps)
    mesh = make_mesh(mesh_cfg, devices)
    shapes = jax.eval_shape(lambda p: init_state(p, tx), params)
    st_sh = state_shardings(shapes, MODEL, mesh, mesh_cfg.rules)
    b_sh = batch_sharding(mesh, mesh_cfg.rules, 8)
    step = jax.jit(make_train_step(MODEL, tx, wsd_schedule(SCHED, steps), accum_steps=accum,
                                   quant=quant,
                                   activation_rules=lambda: activation_rules(mesh, mesh_cfg.rules)),
                   in_shardings=(st_sh, b_sh), out_shardings=(st_sh, None), donate_argnums=0)
    state = jax.jit(lambda p: init_state(p, tx), out_shardings=st_sh)(params)
    losses = []
    for batch in batches(steps):
        state, metrics = step(state, jax.device_put(batch, b_sh))
        losses.append(float(metrics["loss"]))
    q_spec = str(state["params"]["q"].sharding.spec)
    if reshard_to is not None:  # save here, restore onto another mesh: same values
        import tempfile

        from mcpm.train.checkpoints import RunCheckpoints
        other = make_mesh(reshard_to, devices)
        target = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                              shapes, state_shardings(shapes, MODEL, other, reshard_to.rules))
        with tempfile.TemporaryDirectory() as tmp:
            ck = RunCheckpoints(tmp)
            ck.save(steps, state, {}, data_state={})
            ck.wait()
            _, restored, _, _ = ck.restore(target)
            ck.close()
        for name, value in state["params"].items():
            np.testing.assert_array_equal(np.asarray(restored["params"][name]), np.asarray(value))
        q_spec += " -> " + str(restored["params"]["q"].sharding.spec)
    return {"losses": losses, "q_spec": q_spec,
            "first": {k: np.asarray(v).ravel()[:64].tolist() for k, v in state["params"].items()}}


if __name__ == "__main__":
    devices = jax.devices()
    assert len(devices) == 8, devices
    out = {"single": run(MeshConfig(data=1), devices[:1])}
    out["fsdp8"] = run(MeshConfig(data=1, fsdp=8), devices,
                       reshard_to=MeshConfig(data=2, fsdp=1, tensor=4))
    out["tensor2_fsdp4"] = run(MeshConfig(data=1, fsdp=4, tensor=2), devices)
    out["mixed_accum"] = run(MeshConfig(data=2, fsdp=2, tensor=2), devices, accum=2)
    # ternary QAT with group scales: the scales follow their weights' shards
    tern = QuantConfig(method="ternary", group_size=16)
    out["ternary_single"] = run(MeshConfig(data=1), devices[:1], quant=tern)
    out["ternary_tensor2_fsdp4"] = run(MeshConfig(data=1, fsdp=4, tensor=2), devices, accum=2,
                                       quant=tern)
    json.dump(out, sys.stdout)
