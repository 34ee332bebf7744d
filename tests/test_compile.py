"""Compile-level properties of the model: the full-size configs compile quickly through the
layer scan, and bfloat16 compute does not make a bfloat16 copy of the whole model."""
import time

import jax
import jax.numpy as jnp
from flax import nnx

from mcpm.config import load_config
from mcpm.model import MiniCPM4


def compile_forward(cfg, t=128):
    abstract = nnx.eval_shape(lambda: MiniCPM4(cfg, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)

    def forward(state, ids):
        return nnx.merge(graphdef, state)(ids)
    start = time.perf_counter()
    compiled = jax.jit(forward).trace(state, jax.ShapeDtypeStruct((1, t), jnp.int32)).lower().compile()
    return compiled, time.perf_counter() - start


def test_8b_compiles_without_a_model_sized_temporary():
    cfg = load_config("configs/minicpm4-8b.yaml").model
    assert cfg.compute_dtype == "bfloat16" and cfg.num_hidden_layers == 32
    compiled, seconds = compile_forward(cfg)
    mem = compiled.memory_analysis()
    assert mem.argument_size_in_bytes > 30e9   # float32 parameters of the 8B
    # temporaries: one layer's weights in bf16 plus activations, never the whole model
    assert mem.temp_size_in_bytes < 0.1 * mem.argument_size_in_bytes, mem
    assert seconds < 60  # a Python loop over 32 layers would compile far slower; scan is ~2 s


def test_every_parameter_has_logical_axes_matching_its_rank():
    cfg = load_config("configs/tiny.yaml").model
    model = nnx.eval_shape(lambda: MiniCPM4(cfg, rngs=nnx.Rngs(0)))
    specs = nnx.to_pure_dict(nnx.get_partition_spec(nnx.state(model, nnx.Param)))
    shapes = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    assert set(specs) == set(shapes)
    for name, spec in specs.items():
        assert len(tuple(spec)) == len(shapes[name].shape), name
    assert tuple(specs["q"]) == ("layers", "embed", "heads", "head_dim")
    assert tuple(specs["k"]) == ("layers", "embed", "kv_heads", "head_dim")
    assert tuple(specs["embed"]) == ("vocab", "embed")
    assert tuple(specs["down"]) == ("layers", "mlp", "embed")
