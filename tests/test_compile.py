"""Compile-level properties of the model: the full-size configs compile quickly through the
layer scan, bfloat16 compute does not make a bfloat16 copy of the whole model, and generation
compiles once per shape."""
import contextlib
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import mcpm
from mcpm.config import load_config
from mcpm.model import MiniCPM4

# recorded by JAX whenever a function is traced, lowered or compiled (a persistent compilation
# cache hit still traces and lowers)
COMPILE_EVENTS = {"/jax/core/compile/jaxpr_trace_duration",
                  "/jax/core/compile/jaxpr_to_mlir_module_duration",
                  "/jax/core/compile/backend_compile_duration"}


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


@contextlib.contextmanager
def compile_events():
    seen = []

    def listener(event, duration, **kwargs):
        if event in COMPILE_EVENTS:
            seen.append(event)
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield seen
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


def test_generation_compiles_nothing_for_a_shape_it_has_run():
    """Once a batch and cache size have run, generating again (other prompts of the same padded
    width, another seed, other eos ids, another max_new_tokens within the same cache size,
    another stream chunking) traces and compiles nothing at all, host-side setup included."""
    cfg = load_config("configs/tiny.yaml", ["model.num_hidden_layers=2"]).model
    model = MiniCPM4(cfg, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(11)
    prompts = lambda: rng.integers(3, cfg.vocab_size, (2, 5)).astype(np.int32)
    sampled = dict(temperature=0.9, top_k=40, top_p=0.95)
    with compile_events() as first:
        mcpm.generate(model, prompts(), 10, eos_token_id=[7, 9], **sampled)
        list(mcpm.stream_generate(model, prompts(), 10, eos_token_id=[7, 9], chunk_size=4,
                                  **sampled))
    assert first                                        # the listener does see compiles
    with compile_events() as again:
        mcpm.generate(model, prompts(), 10, eos_token_id=[7, 9], **sampled)
        mcpm.generate(model, prompts(), 50, eos_token_id=[5, 3], seed=4, **sampled)
        for chunk in (1, 7, None):
            list(mcpm.stream_generate(model, prompts(), 30, eos_token_id=[7, 9],
                                      chunk_size=chunk, **sampled))
    assert again == []
