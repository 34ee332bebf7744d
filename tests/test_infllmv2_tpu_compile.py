"""The InfLLM v2 Pallas pipeline (stage-1 scoring kernel + XLA top-k, tables, forward, dQ and
dK/dV kernels) compiles for TPU v5e and v5p without a TPU: libtpu's topology descriptions, AOT
on a one-device mesh.
Mosaic rejects mis-tiled blocks and unsupported ops at this compile. The 8B attention layout at
T = 1024 here (the 32K compile takes minutes: experiments/tpu_compile_infllmv2.py)."""
import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mcpm.config import SparseConfig
from mcpm_kernels.infllmv2.api import infllmv2_attention

if importlib.util.find_spec("libtpu") is None:
    pytest.skip("libtpu is not installed (pip install -e '.[test]'): no TPU topology "
                "descriptions to compile against", allow_module_level=True)

from jax.experimental import topologies  # noqa: E402

T = 1024


def compile_for(topology, grad, segments):
    devices = topologies.get_topology_desc(platform="tpu", topology_name=topology).devices
    rep = NamedSharding(Mesh(np.array(devices[:1]), ("x",)), PartitionSpec())
    cfg = SparseConfig(dense_len=-1)       # released sizes; sparse at any length
    shapes = [jax.ShapeDtypeStruct((1, T, 32, 128), jnp.bfloat16)] + \
             [jax.ShapeDtypeStruct((1, T, 2, 128), jnp.bfloat16)] * 2
    if segments:
        shapes.append(jax.ShapeDtypeStruct((1, T), jnp.int32))

    def fwd(q, k, v, *seg):
        return infllmv2_attention(q, k, v, cfg, implementation="pallas",
                                  segment_ids=seg[0] if seg else None, interpret=False)

    fn = jax.grad(lambda *a: fwd(*a).astype(jnp.float32).sum(), (0, 1, 2)) if grad else fwd
    lowered = jax.jit(fn, in_shardings=(rep,) * len(shapes)).trace(*shapes).lower()
    return lowered, lowered.compile()


@pytest.mark.parametrize("topology", ["v5e:1x1", "v5p:1x1x1"])
@pytest.mark.parametrize("grad", [False, True], ids=["fwd", "fwd+bwd"])
def test_compiles_for_tpu(topology, grad):
    lowered, compiled = compile_for(topology, grad, segments=grad)
    # Mosaic kernels in the program (compiled.as_text() of a v5p executable trips an XLA
    # RET_CHECK on async instructions, so count them before compilation)
    # scoring + forward (+ dQ and dK/dV; selection is not differentiated)
    assert lowered.as_text().count("@tpu_custom_call") == (4 if grad else 2)
    mem = compiled.memory_analysis()
    q_bytes = T * 32 * 128 * 2
    # forward: the output; backward: dq, dk, dv. Temporaries stay a few q's, not T x T
    assert mem.output_size_in_bytes <= q_bytes * (1.2 if grad else 1.0)
    assert mem.temp_size_in_bytes < 4 * q_bytes, mem
