"""A packed ternary model traced for TPU runs its layer matmuls as the Pallas kernel
(mcpm_kernels.ternary: bytes unpacked tile by tile in VMEM) where the kernel takes the matrix,
and the XLA unpack path everywhere else: the interpreted kernel gives the CPU path's logits,
tq1 and unsupported group layouts fall back matrix by matrix, the float model's program does
not change, and the decode step compiles for TPU v5e (libtpu topology, no TPU needed)."""
import importlib.util
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import mcpm
import mcpm_kernels.ternary.matmul as ternary_kernel
from mcpm.api import params_of
from mcpm.checkpoint import save_checkpoint
from mcpm.config import ModelConfig, QuantConfig
from mcpm.model.attention import attention_target
from mcpm.model.minicpm4 import KVCache, MiniCPM4, Packing
from mcpm.quant.packed import lower_packed_decode, write_packed
from mcpm.quant.qat import HIDDEN_MATRICES, QUANT_FILE, quant_info, ternarize_params

# Every matrix dim a multiple of 128 (the kernel's lane tile): q/k/v/o/gate/up read 256 inputs
# (R = 64 byte rows), down 512 (R = 128). Groups of 64 divide both R's (no group straddles a
# plane), groups of 128 only down's.
CFG = dict(vocab_size=256, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
           num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128,
           dim_model_base=64, eos_token_id=(2,), initializer_range=0.3,
           # the attention both targets trace the same way, so only the matmuls differ
           attention_impl="einsum")
N_MATRICES = len(HIDDEN_MATRICES)  # packed matrices per layer


@pytest.fixture(scope="module")
def packed_dirs(tmp_path_factory):
    """{(group size, fmt): packed checkpoint dir} of one random ternary model per group size."""
    root = tmp_path_factory.mktemp("packed_tpu")
    cfg = ModelConfig(**CFG)
    params = params_of(MiniCPM4(cfg, rngs=nnx.Rngs(0)))
    out = {}
    for g, fmts in ((0, ("tq2", "tq1")), (64, ("tq2",)), (128, ("tq2",))):
        qcfg = QuantConfig(method="ternary", group_size=g)
        save_checkpoint(root / f"g{g}", cfg, ternarize_params(params, qcfg, cfg),
                        extra_files={QUANT_FILE: json.dumps(quant_info(qcfg, cfg))})
        for fmt in fmts:
            out[(g, fmt)] = write_packed(root / f"g{g}", root / f"g{g}-{fmt}", fmt)["out"]
    return out


@pytest.fixture
def kernel_calls(monkeypatch):
    """Traces of the Pallas kernel from the model (one per packed matrix the scan body uses)."""
    calls = []
    real = ternary_kernel.ternary_matmul_pallas

    def spy(x, packed, scale, k, **kw):
        calls.append((tuple(x.shape), tuple(packed.shape), tuple(scale.shape), k, kw))
        return real(x, packed, scale, k, **kw)
    monkeypatch.setattr(ternary_kernel, "ternary_matmul_pallas", spy)
    return calls


def jaxpr_text(model, ids, **kw):
    graphdef, state = nnx.split(model)
    return str(jax.make_jaxpr(lambda s, i: nnx.merge(graphdef, s)(i, **kw))(state, ids))


def run(model, ids):
    """Logits of ``ids`` without a cache, and of one more token decoded after prefilling them.
    Fresh jitted functions on every call: jit caches a trace by its arguments, not by the
    target platform the model reads while tracing."""
    forward = nnx.jit(lambda m, i: m(i))
    step = nnx.jit(lambda m, i, c: m(i, cache=c))
    _, cache = step(model, ids, KVCache.create(model.config, ids.shape[0], 16))
    return np.asarray(forward(model, ids)), np.asarray(step(model, ids[:, :1], cache)[0])


def rel(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.parametrize("g", [0, 64])
def test_tpu_target_runs_the_kernel_with_the_xla_paths_logits(packed_dirs, kernel_calls, g):
    model = mcpm.from_pretrained(packed_dirs[(g, "tq2")])
    ids = jnp.asarray(np.random.default_rng(g).integers(0, 256, (2, 12)), jnp.int32)
    with attention_target("tpu", interpret=True):
        assert jaxpr_text(model, ids).count("pallas_call") == N_MATRICES  # the scan body's 7
        kernel_calls.clear()
        got, got_step = run(model, ids)
    # traced once per program (the layer scan's body): prefill, forward, decode;
    # o's input is both head axes flattened
    assert len(kernel_calls) == 3 * N_MATRICES
    kernel_calls[:] = kernel_calls[N_MATRICES:2 * N_MATRICES]       # the cache-less forward
    h, i = CFG["hidden_size"], CFG["intermediate_size"]
    assert [c[:2] for c in kernel_calls[:N_MATRICES]] == [
        ((24, h), (h // 4, 256)), ((24, h), (h // 4, 128)), ((24, h), (h // 4, 128)),
        ((24, 256), (256 // 4, h)), ((24, h), (h // 4, i)), ((24, h), (h // 4, i)),
        ((24, i), (i // 4, h))]
    assert all(c[4] == {"interpret": True} for c in kernel_calls)
    assert {c[2] for c in kernel_calls} == ({(1, 1)} if g == 0 else
                                            {(h // g, 256), (h // g, 128), (h // g, i),
                                             (i // g, h)})

    # the same float32 weights (q * scale is exact) and inputs; only the order of the float32
    # sums differs (per plane, per tile): ~6e-8 x sqrt(512) per dot product, through 2 layers
    # (7e-7 observed)
    want, want_step = run(model, ids)                     # CPU: unpack + XLA matmul
    assert len(kernel_calls) == N_MATRICES                # nothing more from the CPU programs
    assert rel(got, want) < 1e-5 and rel(got_step, want_step) < 1e-5
    assert "pallas_call" not in jaxpr_text(model, ids)


@pytest.mark.parametrize("g,fmt,per_layer", [
    (0, "tq1", 0),        # the kernel reads 2-bit bytes only
    (128, "tq2", 1),      # groups of 128 fit down's R = 128 byte rows, not the others' 64
])
def test_matrices_the_kernel_does_not_take_keep_the_xla_path(packed_dirs, kernel_calls, g, fmt,
                                                             per_layer):
    model = mcpm.from_pretrained(packed_dirs[(g, fmt)])
    ids = jnp.zeros((1, 4), jnp.int32)
    with attention_target("tpu", interpret=True):
        text = jaxpr_text(model, ids)
    assert text.count("pallas_call") == per_layer
    assert len(kernel_calls) == per_layer
    if per_layer:
        assert kernel_calls[0][1:4] == ((128, 256), (4, 256), 512)     # down


def test_the_float_models_program_does_not_depend_on_the_target():
    model = MiniCPM4(ModelConfig(**CFG), rngs=nnx.Rngs(0))
    ids = jnp.zeros((1, 4), jnp.int32)
    with attention_target("tpu", interpret=True):
        tpu = jaxpr_text(model, ids)
    assert tpu == jaxpr_text(model, ids) and "pallas_call" not in tpu


# ------------------------------------------------------------------------------------------
# AOT: the decode step compiled for TPU v5e from this host
# ------------------------------------------------------------------------------------------

def lower_decode_for_tpu(fmt, batch, group_size=0, cache_len=256):
    """The decode step of a bfloat16 packed model traced for a one-device v5e mesh, as `mcpm
    aot` traces for a TPU slice: the target platform comes from the hints' devices, not from
    this host's backend."""
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    from mcpm.train.aot import topology_devices
    devices = topology_devices("v5e:1x1")[0]
    rep = NamedSharding(Mesh(np.array(devices[:1]), ("x",)), PartitionSpec())
    cfg = ModelConfig(**{**CFG, "param_dtype": "bfloat16", "compute_dtype": "bfloat16"})
    return lower_packed_decode(cfg, Packing(fmt, HIDDEN_MATRICES, group_size), batch,
                               cache_len, rep)


needs_libtpu = pytest.mark.skipif(
    importlib.util.find_spec("libtpu") is None,
    reason="libtpu is not installed (pip install -e '.[test]'): no TPU topology descriptions "
           "to compile against")


@needs_libtpu
@pytest.mark.parametrize("batch", [1, 8])
def test_decode_step_compiles_for_tpu_with_one_kernel_per_packed_matrix(batch):
    lowered = lower_decode_for_tpu("tq2", batch, group_size=64)
    # the scan body is lowered once: one Mosaic call per packed matrix of a layer
    assert lowered.as_text().count("@tpu_custom_call") == N_MATRICES
    lowered.compile()                                      # Mosaic accepts the tiles


@needs_libtpu
def test_tq1_decode_step_compiles_for_tpu_on_the_xla_path():
    lowered = lower_decode_for_tpu("tq1", 1)
    assert "tpu_custom_call" not in lowered.as_text()
    lowered.compile()


def test_the_kernel_package_imports_before_mcpm():
    # the model imports the kernel module and the kernel module imports mcpm: either order works
    code = "import mcpm_kernels.ternary, mcpm; print(mcpm.MiniCPM4.__name__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert out.returncode == 0 and out.stdout.strip() == "MiniCPM4", out.stderr[-2000:]
