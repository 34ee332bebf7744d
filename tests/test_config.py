"""The config system (mcpm/config.py): YAML + overrides, errors, dict round trips, HF config.json."""
from __future__ import annotations

import copy
import dataclasses
import json
import os
import warnings
from pathlib import Path

import pytest
import yaml

from mcpm.config import (Config, ConfigError, GenerateConfig, ModelConfig, RopeScaling,
                         SparseConfig, from_dict, load_config, model_config_from_hf,
                         model_config_to_hf, save_yaml, to_dict)

SHARED = Path(os.environ.get("MCPM_SHARED", Path(__file__).resolve().parents[2] / "shared"))
FIXTURES = SHARED / "fixtures" / "official-minicpm4"
LONGROPE_8B = SHARED / "spec" / "minicpm4-8b-longrope.json"
FIXTURE_CONFIGS = sorted(FIXTURES.glob("*/hf/config.json"))

SMALL_MODEL = {"vocab_size": 300, "hidden_size": 64, "intermediate_size": 128,
               "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
               "max_position_embeddings": 512, "eos_token_id": [2, 7], "dim_model_base": 16}


def write_yaml(tmp_path, data) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def factors(n, base=1.0):
    return [base + 0.5 * i for i in range(n)]


# ------------------------------------------------------------------------------------------
# YAML and overrides
# ------------------------------------------------------------------------------------------

def test_load_yaml_and_dotted_overrides(tmp_path):
    path = write_yaml(tmp_path, {"model": SMALL_MODEL, "generate": {"top_k": 5}, "seed": 3})
    cfg = load_config(path, ["model.hidden_size=128", "generate.temperature=0.7",
                             "model.eos_token_id=[2, 9]", "seed=11",
                             "model.compute_dtype=bfloat16"])
    assert isinstance(cfg, Config)
    m = cfg.model
    assert m.hidden_size == 128 and isinstance(m.hidden_size, int)
    assert m.vocab_size == 300 and m.num_attention_heads == 4
    assert m.head_dim == 32
    assert m.eos_token_id == (2, 9)  # lists become tuples
    assert m.compute_dtype == "bfloat16"
    assert cfg.generate.top_k == 5 and cfg.generate.temperature == pytest.approx(0.7)
    assert cfg.seed == 11
    # untouched fields keep their defaults
    assert m.scale_emb == 12.0 and cfg.generate.max_new_tokens == GenerateConfig().max_new_tokens


def test_later_override_wins_and_file_is_not_modified(tmp_path):
    path = write_yaml(tmp_path, {"model": SMALL_MODEL})
    before = path.read_text()
    cfg = load_config(path, ["model.num_hidden_layers=3", "model.num_hidden_layers=5"])
    assert cfg.model.num_hidden_layers == 5
    assert path.read_text() == before
    assert load_config(path).model.num_hidden_layers == 2


def test_defaults_without_file():
    cfg = load_config(None, [])
    assert cfg == Config()
    assert cfg.model.hidden_size == 1024 and cfg.model.eos_token_id == (2, 73440)


def test_nested_section_override_creates_section(tmp_path):
    path = write_yaml(tmp_path, {"model": SMALL_MODEL})
    cfg = load_config(path, ["model.sparse_config.topk=16", "model.sparse_config.dense_len=-1"])
    assert cfg.model.sparse_config == SparseConfig(topk=16, dense_len=-1)
    lf = factors(8)  # head_dim 16
    cfg = load_config(path, [f"model.rope_scaling={{long_factor: {lf}, short_factor: {lf}, "
                             "original_max_position_embeddings: 256}",
                             "model.rope_scaling.original_max_position_embeddings=128"])
    assert cfg.model.rope_scaling == RopeScaling(tuple(lf), tuple(lf), 128)


@pytest.mark.parametrize("override,key,suggestion", [
    ("model.hiden_size=3", "model.hiden_size", "hidden_size"),
    ("model.num_atention_heads=3", "model.num_atention_heads", "num_attention_heads"),
    ("modle.hidden_size=3", "modle", "model"),
    ("generate.top_kk=3", "generate.top_kk", "top_k"),
    ("model.sparse_config.topkk=3", "model.sparse_config.topkk", "topk"),
])
def test_unknown_override_key_names_key_and_suggests(override, key, suggestion):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    msg = str(e.value)
    assert key in msg and f"'{suggestion}'" in msg


def test_unknown_key_in_yaml_file(tmp_path):
    path = write_yaml(tmp_path, {"model": {**SMALL_MODEL, "rms_norm_epsilon": 1e-5}})
    with pytest.raises(ConfigError) as e:
        load_config(path)
    msg = str(e.value)
    assert "model.rms_norm_epsilon" in msg and "rms_norm_eps" in msg
    assert str(path) in msg  # says which file


@pytest.mark.parametrize("override,key", [
    ("model.hidden_size=abc", "model.hidden_size"),
    ("model.hidden_size=1.5", "model.hidden_size"),
    ("model.tie_word_embeddings=3", "model.tie_word_embeddings"),
    ("model.rms_norm_eps=true", "model.rms_norm_eps"),
    ("model.eos_token_id=[2, x]", "model.eos_token_id[1]"),
    ("model.compute_dtype=bf16", "model.compute_dtype"),
    ("generate.top_p=high", "generate.top_p"),
    ("seed=[1]", "seed"),
])
def test_bad_value_type_names_key(override, key):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert key in str(e.value)


def test_bad_literal_suggests_closest_choice():
    with pytest.raises(ConfigError, match="bfloat16"):
        load_config(None, ["model.compute_dtype=bf16"])


@pytest.mark.parametrize("override", ["model.hidden_size", "=3", "model..x=1"])
def test_malformed_override(override):
    with pytest.raises(ConfigError):
        load_config(None, [override])


def test_override_into_a_value_fails():
    with pytest.raises(ConfigError, match="model.hidden_size"):
        load_config(None, ["model.hidden_size.x=3"])


def test_integral_float_accepted_for_int_and_int_for_float():
    cfg = load_config(None, ["model.hidden_size=2048.0", "model.scale_emb=3"])
    assert cfg.model.hidden_size == 2048 and type(cfg.model.hidden_size) is int
    assert cfg.model.scale_emb == 3.0 and type(cfg.model.scale_emb) is float


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(bad)


def test_duplicate_keys_are_refused_with_path_and_lines(tmp_path):
    path = tmp_path / "dup.yaml"
    path.write_text("model:\n  hidden_size: 64\n  num_hidden_layers: 2\n  hidden_size: 128\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert str(e.value) == (f"{path}: the key 'model.hidden_size' is given twice (lines 2 and "
                            "4); the later one would silently win: keep one of them")
    path.write_text("data:\n  sources:\n    - kind: files\n      paths: [a]\n"
                    "      kind: builtin\nseed: 1\n")
    with pytest.raises(ConfigError, match=r"dup\.yaml: the key 'data\.sources\[0\]\.kind' is "
                                          r"given twice \(lines 3 and 5\)"):
        load_config(path)
    path.write_text("seed: 1\nseed: 1\n")  # even with the same value
    with pytest.raises(ConfigError, match=r"'seed' is given twice \(lines 1 and 2\)"):
        load_config(path)
    with pytest.raises(ConfigError, match=r"override 'model\.rope_scaling=\{a: 1, a: 2\}': the "
                                          r"key 'model\.rope_scaling\.a' is given twice"):
        load_config(None, ["model.rope_scaling={a: 1, a: 2}"])
    # merge keys are meant to be overridden, and other files still load
    path.write_text("generate: &g {top_k: 3, seed: 1}\nmodel: {}\n"
                    "train: {schedule: {<<: {peak_lr: 0.1}, peak_lr: 0.2}}\n")
    assert load_config(path).train.schedule.peak_lr == 0.2


def test_errors_name_the_override_or_the_file_that_causes_them(tmp_path):
    path = write_yaml(tmp_path, {"model": SMALL_MODEL})
    with pytest.raises(ConfigError) as e:
        load_config(path, ["seed=3", "model.hidden_size=abc"])
    assert str(e.value) == ("override model.hidden_size=abc: model.hidden_size: expected an "
                            "integer, got 'abc'")
    with pytest.raises(ConfigError) as e:
        load_config(path, ["model.num_attention_heads=3"])
    assert str(e.value).startswith("override model.num_attention_heads=3: model.hidden_size "
                                   "(64) must be divisible")
    with pytest.raises(ConfigError, match=r"^override model\.hiden_size=3: unknown config key "
                                          r"'model\.hiden_size'; did you mean 'hidden_size'"):
        load_config(path, ["model.hiden_size=3"])
    bad = write_yaml(tmp_path, {"model": {**SMALL_MODEL, "hidden_size": "abc"}})
    with pytest.raises(ConfigError) as e:
        load_config(bad, ["model.num_hidden_layers=3"])
    assert str(e.value) == f"{bad}: model.hidden_size: expected an integer, got 'abc'"
    # overrides are checked together: one may fix what the file or an earlier one breaks
    odd = write_yaml(tmp_path, {"model": {**SMALL_MODEL, "num_attention_heads": 3}})
    cfg = load_config(odd, ["model.num_attention_heads=8", "model.num_key_value_heads=4"])
    assert cfg.model.num_key_value_heads == 4
    # YAML types json cannot copy (dates) are reported, not a TypeError
    dated = tmp_path / "dated.yaml"
    dated.write_text("seed: 2024-01-01\n")
    with pytest.raises(ConfigError, match=r"dated\.yaml: seed: expected an integer"):
        load_config(dated, ["model.hidden_size=128"])
    with pytest.raises(ConfigError, match="is a directory"):
        load_config(tmp_path)
    (tmp_path / "latin1.yaml").write_bytes(b"seed: 1 # caf\xe9\n")
    with pytest.raises(ConfigError, match=r"latin1\.yaml: not a text file"):
        load_config(tmp_path / "latin1.yaml")


# ------------------------------------------------------------------------------------------
# validation
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("overrides,words", [
    (["model.hidden_size=100"], ["hidden_size", "num_attention_heads"]),
    (["model.num_key_value_heads=3"], ["num_key_value_heads"]),
    (["model.hidden_size=48", "model.num_attention_heads=16"], ["head_dim"]),  # d = 3, odd
    (["model.vocab_size=0"], ["vocab_size"]),
    (["model.dim_model_base=0"], ["dim_model_base"]),
    (["model.eos_token_id=[]"], ["eos_token_id"]),
    (["model.vocab_size=100"], ["73440"]),  # default eos outside the vocabulary
    (["generate.top_p=0"], ["top_p"]),
    (["generate.temperature=-1"], ["temperature"]),
])
def test_validation_errors(overrides, words):
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    for w in words:
        assert w in str(e.value)


def test_longrope_factor_count_must_be_half_head_dim(tmp_path):
    # default model: head_dim 64 -> 32 factors
    good = {"long_factor": factors(32), "short_factor": factors(32, 2.0),
            "original_max_position_embeddings": 4096}
    cfg = from_dict(Config, {"model": {"rope_scaling": good}})
    assert len(cfg.model.rope_scaling.long_factor) == 32
    for n in (31, 64):
        bad = dict(good, long_factor=factors(n), short_factor=factors(n))
        with pytest.raises(ConfigError, match="rope_scaling") as e:
            from_dict(Config, {"model": {"rope_scaling": bad}})
        assert str(n) in str(e.value) and "32" in str(e.value)
    # long and short must have the same length
    with pytest.raises(ConfigError, match="short_factor"):
        RopeScaling(tuple(factors(32)), tuple(factors(31)), 4096)
    with pytest.raises(ConfigError, match="positive"):
        RopeScaling(tuple(factors(4)), (1.0, 0.0, 1.0, 1.0), 4096)
    with pytest.raises(ConfigError, match="original_max_position_embeddings"):
        RopeScaling(tuple(factors(4)), tuple(factors(4)), 0)
    with pytest.raises(ConfigError, match="longrope"):
        from_dict(Config, {"model": {"rope_scaling": dict(good, rope_type="yarn")}})


@pytest.mark.parametrize("sparse,word", [
    ({"kernel_size": 30}, "kernel_size"),          # must be 2 x kernel_stride
    ({"block_size": 40}, "block_size"),            # multiple of kernel_stride
    ({"window_size": 1000}, "window_size"),        # multiple of block_size
    ({"topk": 0}, "topk"),
    ({"init_blocks": -1}, "init_blocks"),
    ({"dense_len": -2}, "dense_len"),
    ({"use_nope": "no"}, "use_nope"),
    ({"topK": 3}, "topk"),
])
def test_bad_sparse_config(sparse, word):
    with pytest.raises(ConfigError) as e:
        from_dict(Config, {"model": {"sparse_config": sparse}})
    assert word in str(e.value)


def test_valid_sparse_config_values():
    cfg = from_dict(Config, {"model": {"sparse_config": {"kernel_size": 64, "kernel_stride": 32,
                                                         "block_size": 128, "window_size": 256,
                                                         "dense_len": -1}}})
    sc = cfg.model.sparse_config
    assert (sc.kernel_size, sc.kernel_stride, sc.block_size, sc.window_size, sc.dense_len) == \
        (64, 32, 128, 256, -1)


def test_missing_required_field_is_a_config_error():
    with pytest.raises(ConfigError, match="long_factor"):
        load_config(None, ["model.rope_scaling.original_max_position_embeddings=4"])


# ------------------------------------------------------------------------------------------
# to_dict / from_dict / YAML round trips
# ------------------------------------------------------------------------------------------

def rich_config() -> Config:
    model = ModelConfig(**{**SMALL_MODEL, "eos_token_id": (2, 7)},
                        rope_scaling=RopeScaling(tuple(factors(8)), tuple(factors(8, 3.0)), 256),
                        sparse_config=SparseConfig(topk=8, dense_len=1024, use_nope=True),
                        tie_word_embeddings=False, compute_dtype="bfloat16", remat="dots",
                        mup_scale_embedding=True, scale_emb=2.5)
    return Config(model=model, generate=GenerateConfig(temperature=0.5, top_k=3, top_p=0.9),
                  seed=42)


def test_to_dict_from_dict_round_trip():
    cfg = rich_config()
    d = to_dict(cfg)
    # plain data only: json-serialisable, tuples written as lists
    assert json.loads(json.dumps(d)) == d
    assert d["model"]["eos_token_id"] == [2, 7]
    assert isinstance(d["model"]["rope_scaling"]["long_factor"], list)
    assert from_dict(Config, d) == cfg
    assert from_dict(Config, to_dict(Config())) == Config()
    assert from_dict(ModelConfig, to_dict(cfg.model)) == cfg.model


def test_save_yaml_load_config_round_trip(tmp_path):
    cfg = rich_config()
    path = tmp_path / "saved.yaml"
    save_yaml(cfg, path)
    assert load_config(path) == cfg
    assert load_config(path, ["model.num_hidden_layers=7"]) == dataclasses.replace(
        cfg, model=dataclasses.replace(cfg.model, num_hidden_layers=7))


# ------------------------------------------------------------------------------------------
# HF config.json
# ------------------------------------------------------------------------------------------

def official_8b_dict() -> dict:
    if not LONGROPE_8B.is_file():
        pytest.skip(f"{LONGROPE_8B} not found (set MCPM_SHARED)")
    f = json.loads(LONGROPE_8B.read_text())["factors_32k"]
    assert len(f) == 64
    return {
        "architectures": ["MiniCPMForCausalLM"],
        "auto_map": {"AutoConfig": "configuration_minicpm.MiniCPMConfig",
                     "AutoModelForCausalLM": "modeling_minicpm.MiniCPMForCausalLM"},
        "bos_token_id": 1,
        "eos_token_id": [2, 73440],
        "hidden_act": "silu",
        "hidden_size": 4096,
        "initializer_range": 0.1,
        "intermediate_size": 16384,
        "max_position_embeddings": 32768,
        "model_type": "minicpm",
        "num_attention_heads": 32,
        "num_hidden_layers": 32,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-06,
        "rope_scaling": {"rope_type": "longrope", "long_factor": list(f), "short_factor": list(f),
                         "original_max_position_embeddings": 32768},
        "torch_dtype": "bfloat16",
        "transformers_version": "4.46.3",
        "use_cache": True,
        "vocab_size": 73448,
        "scale_emb": 12,
        "dim_model_base": 256,
        "scale_depth": 1.4,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "sparse_config": {"kernel_size": 32, "kernel_stride": 16, "init_blocks": 1,
                          "block_size": 64, "window_size": 2048, "topk": 64,
                          "use_nope": False, "dense_len": 8192},
    }


@pytest.mark.parametrize("path", FIXTURE_CONFIGS, ids=lambda p: p.parent.parent.name)
def test_fixture_config_round_trip_exact(path):
    hf = json.loads(path.read_text())
    original = copy.deepcopy(hf)
    cfg = model_config_from_hf(hf)
    assert hf == original  # input not mutated
    assert model_config_to_hf(cfg, hf) == hf
    # byte-exact when written back out (key order, 12 vs 12.0)
    assert json.dumps(model_config_to_hf(cfg, hf)) == json.dumps(hf)
    # and what was read is right
    assert cfg.hidden_size == hf["hidden_size"]
    assert cfg.num_key_value_heads == hf["num_key_value_heads"]
    assert cfg.dim_model_base == hf["dim_model_base"]
    assert cfg.tie_word_embeddings == hf.get("tie_word_embeddings", True)
    assert cfg.eos_token_id == (hf["eos_token_id"],)
    rs = hf["rope_scaling"]
    assert cfg.rope_scaling.long_factor == tuple(rs["long_factor"])
    assert cfg.rope_scaling.short_factor == tuple(rs["short_factor"])
    assert cfg.rope_scaling.original_max_position_embeddings == rs["original_max_position_embeddings"]
    assert cfg.sparse_config is None
    # without a template: back to the same ModelConfig
    assert model_config_from_hf(model_config_to_hf(cfg)) == cfg


def test_fixture_configs_present():
    if not FIXTURES.is_dir():
        pytest.skip(f"official fixtures not found at {FIXTURES} (set MCPM_SHARED)")
    names = {p.parent.parent.name for p in FIXTURE_CONFIGS}
    assert {"tied_longrope_ext", "untied_longrope"} <= names


def test_official_8b_config():
    hf = official_8b_dict()
    cfg = model_config_from_hf(hf)
    assert (cfg.vocab_size, cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads,
            cfg.num_key_value_heads, cfg.intermediate_size) == (73448, 4096, 32, 32, 2, 16384)
    assert cfg.head_dim == 128 and cfg.num_groups == 16
    assert cfg.tie_word_embeddings is False
    assert cfg.eos_token_id == (2, 73440)
    assert cfg.width_mult == 16.0 and cfg.scale_emb == 12.0
    assert len(cfg.rope_scaling.long_factor) == 64
    assert cfg.rope_scaling.long_factor == cfg.rope_scaling.short_factor
    assert cfg.sparse_config == SparseConfig(kernel_size=32, kernel_stride=16, init_blocks=1,
                                             block_size=64, window_size=2048, topk=64,
                                             use_nope=False, dense_len=8192)
    out = model_config_to_hf(cfg, hf)
    assert out == hf
    assert out["eos_token_id"] == [2, 73440]  # list-valued eos stays a list
    assert list(out) == list(hf)  # key order kept
    assert model_config_from_hf(model_config_to_hf(cfg)) == cfg
    # run options do not leak into config.json
    cfg_bf = model_config_from_hf(hf, compute_dtype="bfloat16", remat="full")
    assert cfg_bf.compute_dtype == "bfloat16" and cfg_bf.remat == "full"
    assert model_config_to_hf(cfg_bf, hf) == hf


def test_template_number_spelling_and_eos_list_kept():
    """12 vs 12.0 and a one-element eos list survive exactly (dict equality cannot see
    int vs float, so compare the JSON text)."""
    hf = official_8b_dict()
    hf.update(scale_emb=12.0, dim_model_base=256.0, rope_theta=10000, scale_depth=1.4,
              eos_token_id=[2])
    cfg = model_config_from_hf(hf)
    assert cfg.eos_token_id == (2,)
    out = model_config_to_hf(cfg, hf)
    assert json.dumps(out) == json.dumps(hf)
    hf["eos_token_id"] = 2
    assert json.dumps(model_config_to_hf(model_config_from_hf(hf), hf)) == json.dumps(hf)


def test_changed_values_are_written_over_template():
    hf = official_8b_dict()
    cfg = dataclasses.replace(model_config_from_hf(hf), num_hidden_layers=4, scale_emb=6.5,
                              sparse_config=None)
    out = model_config_to_hf(cfg, hf)
    assert out["num_hidden_layers"] == 4 and out["scale_emb"] == 6.5
    assert out["sparse_config"] is None
    assert out["auto_map"] == hf["auto_map"]  # keys mcpm does not own pass through
    assert model_config_from_hf(out) == cfg


def test_missing_dim_model_base_warns_and_uses_1():
    hf = official_8b_dict()
    del hf["dim_model_base"]
    with pytest.warns(UserWarning, match="dim_model_base"):
        cfg = model_config_from_hf(hf)
    assert cfg.dim_model_base == 1
    assert cfg.width_mult == 4096  # logits divided by hidden_size
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert model_config_to_hf(cfg, hf) == hf  # the key stays absent
    # present: no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model_config_from_hf(official_8b_dict())


def test_hf_defaults_and_spellings():
    base = {"vocab_size": 320, "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 2, "num_attention_heads": 8, "dim_model_base": 16,
            "eos_token_id": 2}
    cfg = model_config_from_hf(base)
    assert cfg.num_key_value_heads == 8  # absent -> one kv head per query head
    assert cfg.tie_word_embeddings is True and cfg.rope_scaling is None
    assert cfg.sparse_config is None
    # old "type" spelling of the rope type and an ignored "factor"
    f = [1.0, 2.0, 3.0, 4.0]
    old = dict(base, rope_scaling={"type": "longrope", "long_factor": f, "short_factor": f,
                                   "original_max_position_embeddings": 64, "factor": 2.0})
    cfg_old = model_config_from_hf(old)
    assert cfg_old.rope_scaling == RopeScaling(tuple(f), tuple(f), 64)
    full = dict(official_8b_dict(), rope_scaling=dict(
        {"type": "longrope", "factor": 2.0, "original_max_position_embeddings": 32768},
        long_factor=official_8b_dict()["rope_scaling"]["long_factor"],
        short_factor=official_8b_dict()["rope_scaling"]["short_factor"]))
    out = model_config_to_hf(model_config_from_hf(full), full)
    assert out == full and "rope_type" not in out["rope_scaling"]


def test_minimal_hf_config_template_round_trip():
    base = {"vocab_size": 320, "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 2, "num_attention_heads": 8, "dim_model_base": 16,
            "eos_token_id": 2}
    assert model_config_to_hf(model_config_from_hf(base), base) == base


@pytest.mark.parametrize("change,word", [
    ({"model_type": "llama"}, "model_type"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"attention_bias": True}, "attention_bias"),
    ({"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, "dynamic"),
    ({"hidden_size": "big"}, "hidden_size"),
    ({"unknown_mcpm_field_is_ignored": 1, "num_attention_heads": 7}, "num_attention_heads"),
])
def test_hf_config_errors(change, word):
    hf = dict(official_8b_dict(), **change)
    with pytest.raises(ConfigError) as e:
        model_config_from_hf(hf, source="some/config.json")
    assert word in str(e.value) and "some/config.json" in str(e.value)


def test_hf_missing_required_key():
    hf = official_8b_dict()
    del hf["hidden_size"]
    with pytest.raises(ConfigError, match="hidden_size"):
        model_config_from_hf(hf)


@pytest.mark.parametrize("cfg", [
    ModelConfig(),
    ModelConfig(**{**SMALL_MODEL, "eos_token_id": (2,)}),
    ModelConfig(**{**SMALL_MODEL, "eos_token_id": (2, 7), "dim_model_base": 16.5},
                tie_word_embeddings=False,
                rope_scaling=RopeScaling(tuple(factors(8)), tuple(factors(8, 2.0)), 128),
                sparse_config=SparseConfig(dense_len=-1), scale_emb=2.5, scale_depth=1.0,
                rope_theta=5e5, rms_norm_eps=1e-5, initializer_range=0.02),
], ids=["default", "single_eos", "everything"])
def test_to_hf_without_template_round_trip(cfg):
    hf = model_config_to_hf(cfg)
    assert hf["model_type"] == "minicpm"
    assert hf["architectures"] == ["MiniCPMForCausalLM"]
    assert json.loads(json.dumps(hf)) == hf  # valid JSON content
    assert "dim_model_base" in hf  # always written, so no warning when read back
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        back = model_config_from_hf(hf)
    assert back == cfg
    if cfg.rope_scaling is not None:
        assert hf["rope_scaling"]["rope_type"] == "longrope"


def test_hf_missing_scale_keys_use_official_defaults():
    hf = official_8b_dict()
    del hf["scale_emb"], hf["scale_depth"]
    cfg = model_config_from_hf(hf)
    assert cfg.scale_emb == 1 and cfg.scale_depth == 1


def test_nested_validation_errors_carry_the_full_path():
    with pytest.raises(ConfigError, match=r"model\.sparse_config\.topk must be positive"):
        load_config(None, ["model.sparse_config={topk: 0}"])
