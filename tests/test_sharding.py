"""Mesh shapes and the logical-axis rules. The rules are pure functions of the mesh shape, so
they are checked on abstract meshes of any size; real multi-device runs are in test_train."""
import jax
import pytest
from jax.sharding import AbstractMesh, AxisType, PartitionSpec as P

from mcpm.config import ConfigError, MeshConfig, ModelConfig, ShardingRules, from_dict
from mcpm.sharding import logical_spec, param_specs

MODEL = ModelConfig(vocab_size=4096, hidden_size=256, intermediate_size=640, num_hidden_layers=4,
                    num_attention_heads=4, num_key_value_heads=2, dim_model_base=64,
                    eos_token_id=(2,))


def mesh(data, fsdp, tensor):
    return AbstractMesh((data, fsdp, tensor), ("data", "fsdp", "tensor"),
                        axis_types=(AxisType.Auto,) * 3)


def test_mesh_shape_fills_minus_one_and_rejects_bad_sizes():
    assert MeshConfig().shape(8) == (8, 1, 1)
    assert MeshConfig(data=2, fsdp=-1, tensor=2).shape(8) == (2, 2, 2)
    with pytest.raises(ConfigError, match="cannot be split"):
        MeshConfig(fsdp=3).shape(8)
    with pytest.raises(ConfigError, match="4 devices, but 8"):
        MeshConfig(data=2, fsdp=2, tensor=1).shape(8)
    with pytest.raises(ConfigError, match="only one"):
        MeshConfig(data=-1, fsdp=-1)
    with pytest.raises(ConfigError, match="did you mean 'tensor'"):
        from_dict(MeshConfig, {"rules": {"mlp": ["tensr"]}})


def test_default_rules_fsdp_over_embed_tensor_over_heads_mlp_vocab():
    specs = param_specs(MODEL, mesh(2, 2, 2), ShardingRules())
    assert specs["q"] == P(None, "fsdp", "tensor", None)
    assert specs["k"] == P(None, "fsdp", "tensor", None)
    assert specs["o"] == P(None, "tensor", None, "fsdp")
    assert specs["down"] == P(None, "tensor", "fsdp")
    assert specs["embed"] == P("tensor", "fsdp")
    assert specs["attn_norm"] == P(None, "fsdp")


def test_indivisible_dims_and_size_one_axes_stay_replicated():
    specs = param_specs(MODEL, mesh(1, 1, 4), ShardingRules())
    assert specs["k"] == P(None, None, None, None)        # 2 kv heads on tensor = 4
    assert specs["q"] == P(None, None, "tensor", None)    # 4 heads do split
    assert logical_spec(("batch", "length"), (6, 128), ShardingRules(), mesh(2, 4, 1)) == \
        P("data", None)                                    # 6 rows: (data, fsdp) = 8 does not divide
    assert logical_spec(("batch", "length"), (16, 128), ShardingRules(), mesh(2, 4, 1)) == \
        P(("data", "fsdp"), None)


def test_rules_are_overridable():
    rules = from_dict(ShardingRules, {"embed": [], "mlp": ["fsdp", "tensor"]})
    specs = param_specs(MODEL, mesh(1, 2, 2), rules)
    assert specs["gate"] == P(None, None, ("fsdp", "tensor"))
    assert specs["embed"] == P("tensor", None)


def test_real_mesh_on_the_local_devices():
    from mcpm.sharding import make_mesh
    m = make_mesh(MeshConfig())
    assert m.shape["data"] == jax.device_count()
