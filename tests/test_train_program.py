"""One train program: the loop, `mcpm aot` and the benchmarks build their step with
`mcpm.train.program.build_train_program`, so what is compiled for a TPU slice is what a run
executes (schedule with its decay start, z-loss, accumulation)."""
import re

import jax
import numpy as np
import pytest
from test_train_loop import config, source

from mcpm.train import aot as aot_mod
from mcpm.train import loop as loop_mod
from mcpm.train import program as program_mod
from mcpm.train.schedule import wsd_schedule


def step_jaxpr(program) -> str:
    """The step's computation as text, meshes and devices left out (they are the place, not the
    program)."""
    state = program.abstract_state
    batch = program.batch_spec(program.cfg.data.batch_size, program.cfg.data.seq_len)
    text = str(jax.make_jaxpr(program.step.__wrapped__)(state, batch))
    text = re.sub(r"device_kind=[^,]*, num_cores=[^,]*, platform=\w+", "", text)
    return re.sub(r"Mesh\([^)]*\)|\w*Device\([^)]*\)|device_ids=\[[^\]]*\]", "", text)


def test_the_loop_and_aot_compile_one_program(tmp_path, monkeypatch):
    pytest.importorskip("libtpu", reason="AOT compilation needs libtpu (pip install -e '.[test]')")
    built = []

    def spy(cfg, mesh=None, **kw):
        built.append(program_mod.build_train_program(cfg, mesh, **kw))
        return built[-1]
    monkeypatch.setattr(loop_mod, "build_train_program", spy)
    monkeypatch.setattr(aot_mod, "build_train_program", spy)

    # attention pinned: `auto` picks per backend, so a TPU program may attend differently
    pin = "model.attention_impl=einsum"
    main = config(tmp_path, "train.steps=4", "train.z_loss=1e-3", "train.accum_steps=2", pin)
    loop_mod.train(main, data=source(main), progress=False)
    branch = config(tmp_path, "train.steps=4", "train.z_loss=1e-3", "train.accum_steps=2", pin,
                    "train.decay_from=2", "train.decay_steps=3",
                    "train.schedule.decay_shape=linear")
    loop_mod.train(branch, data=source(branch), progress=False)
    report = aot_mod.compile_train_step(branch, "v5e-1", branch.data.batch_size,
                                        branch.data.seq_len)
    assert report["fits"]
    _, ran, compiled = built
    assert (ran.total_steps, ran.decay_start) == (compiled.total_steps, compiled.decay_start) == (5, 2)
    steps = np.arange(7)
    want = [float(wsd_schedule(branch.train.schedule, 5, 2)(s)) for s in steps]
    for program in (ran, compiled):
        np.testing.assert_allclose([float(program.schedule(s)) for s in steps], want, rtol=1e-6)
    jaxpr = step_jaxpr(ran)
    assert jaxpr == step_jaxpr(compiled)
    # the z-loss and the accumulation are in it: without them the program differs
    for change in ("train.z_loss=0.0", "train.accum_steps=1"):
        other = config(tmp_path, "train.steps=4", "train.z_loss=1e-3", "train.accum_steps=2", pin,
                       "train.decay_from=2", "train.decay_steps=3",
                       "train.schedule.decay_shape=linear", change)
        assert step_jaxpr(program_mod.build_train_program(other, ran.mesh)) != jaxpr, change


def test_the_gpu_train_program_lowers_for_cuda(tmp_path):
    """The step a GPU runs (bfloat16 compute, packed rows: auto picks the flash kernel there)
    lowers for CUDA on this CPU-only machine: no CPU-only op or custom call in it."""
    from mcpm.model.attention import attention_target, dense_implementation
    cfg = config(tmp_path, "model.compute_dtype=bfloat16", "data.seq_len=128")
    program = program_mod.build_train_program(cfg)
    with attention_target("gpu"):
        assert dense_implementation(cfg.model, key_len=128, packed=True,
                                    dtype=jax.numpy.bfloat16) == "flash"
        lowered = program.step.trace(program.abstract_state,
                                     program.batch_spec(4, 128)).lower(
            lowering_platforms=("cuda",))
    text = lowered.as_text()
    assert "stablehlo.dot_general" in text and "custom_call" not in text
