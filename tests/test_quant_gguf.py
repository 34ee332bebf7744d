"""GGUF export (mcpm.quant.gguf): tensors, layouts and metadata read back with the gguf package.

The ternary checkpoints here are written directly from numpy ternary matrices q and scales s
(what a QAT run saves: every quantized weight is q * s), so the expected GGUF values are stated
independently of mcpm.quant: q * fp16(s) in llama.cpp's [out, in] rows, with q and k rows in
the pair order of llama.cpp's RoPE. A numpy forward that reads the file the way llama.cpp's
minicpm graph does is compared with mcpm's model."""
import dataclasses
import json
import math
import shutil

import gguf
import numpy as np
import pytest

from mcpm.checkpoint import save_checkpoint
from mcpm.config import ModelConfig, RopeScaling
from mcpm.data.builtin_corpus import stdlib_source_files
from mcpm.model.minicpm4 import param_shapes
from mcpm.quant.gguf import GGUFExportError, export_gguf
from mcpm.quant.ternary import QuantError
from mcpm.tokenizer import Tokenizer, train_tokenizer

TQ = {"tq2": gguf.GGMLQuantizationType.TQ2_0, "tq1": gguf.GGMLQuantizationType.TQ1_0}
TERNARY = ("q", "k", "v", "o", "gate", "up", "down", "embed", "lm_head")

# hidden 256: q/k/v/gate/up/embed/lm_head rows are whole TQ blocks; ffn_down's 640 inputs are not
CFG = ModelConfig(vocab_size=520, hidden_size=256, intermediate_size=640, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, dim_model_base=64,
                  max_position_embeddings=128, rope_theta=5000.0, rms_norm_eps=1e-5,
                  scale_emb=10.0, scale_depth=1.3, eos_token_id=(2,), tie_word_embeddings=False)


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok")
    train_tokenizer(stdlib_source_files(limit=20), out, vocab_size=512, max_sentences=5000)
    return out


def matrix_to_param(name, m, cfg):
    """A parameter in mcpm's layout from its matrices [L, in, out] ([in, out] for embed and
    lm_head), per the layout table of mcpm.model.minicpm4."""
    shape = param_shapes(cfg)[name]
    if name == "embed":
        return np.ascontiguousarray(m.T)
    return np.ascontiguousarray(m.reshape(shape))


def param_matrix_shape(name, cfg):
    shape = param_shapes(cfg)[name]
    if name == "embed":
        return shape[::-1]
    if name == "lm_head":
        return shape
    n_in = 2 if name == "o" else 1
    return (shape[0], math.prod(shape[1:1 + n_in]), math.prod(shape[1 + n_in:]))


def random_params(cfg, seed, group=0, ternary=TERNARY):
    """(params, {name: (q [.., in, out], s)}) with every ``ternary`` weight q * s exactly."""
    rng = np.random.default_rng(seed)
    params, qs = {}, {}
    for name, shape in param_shapes(cfg).items():
        if name.endswith("norm"):
            params[name] = (1 + 0.2 * rng.standard_normal(shape)).astype(np.float32)
            continue
        if name not in ternary:
            params[name] = (0.05 * rng.standard_normal(shape)).astype(np.float32)
            continue
        mshape = param_matrix_shape(name, cfg)
        q = rng.integers(-1, 2, size=mshape).astype(np.int8)
        n_in = mshape[-2]
        sshape = (*mshape[:-2], n_in // group, mshape[-1]) if group else (*mshape[:-2], 1, 1)
        s = rng.uniform(0.01, 0.08, size=sshape).astype(np.float32)   # not fp16 values
        full = np.repeat(s, group, axis=-2) if group else s
        params[name] = matrix_to_param(name, q * full, cfg)
        qs[name] = (q, s)
    return params, qs


def make_checkpoint(path, cfg, tok_dir, seed=0, group=None, ternary=TERNARY):
    params, qs = random_params(cfg, seed, group or 0, ternary if group is not None else ())
    extra = {}
    if group is not None:
        extra["quant.json"] = json.dumps({"method": "ternary", "group_size": group,
                                          "tensors": list(ternary)})
    save_checkpoint(path, cfg, params, aux_dir=tok_dir, extra_files=extra)
    return params, qs


def hf_rows_from_pair_rows(g_rows, head_dim):
    """Undo llama.cpp's q/k order: its row n*D + 2j + c holds HF row n*D + c*D/2 + j."""
    out = np.empty_like(g_rows)
    for r in range(g_rows.shape[0]):
        n, rem = divmod(r, head_dim)
        j, c = divmod(rem, 2)
        out[n * head_dim + c * head_dim // 2 + j] = g_rows[r]
    return out


def hf_rows(name, w, cfg, layer=None):
    """The official [out, in] weight of an mcpm parameter (one layer of it)."""
    x = w if layer is None else w[layer]
    if name in ("q", "k", "v"):          # [H, n, D] -> [n*D, H]
        return x.reshape(x.shape[0], -1).T
    if name == "o":                      # [N, D, H] -> [H, N*D]
        return x.reshape(-1, x.shape[-1]).T
    if name in ("gate", "up", "down", "lm_head"):
        return x.T
    return x                             # embed [V, H], norms


GGUF_NAMES = {"q": "attn_q", "k": "attn_k", "v": "attn_v", "o": "attn_output",
              "gate": "ffn_gate", "up": "ffn_up", "down": "ffn_down",
              "attn_norm": "attn_norm", "mlp_norm": "ffn_norm"}


def read_tensors(path):
    reader = gguf.GGUFReader(path)
    out = {}
    for t in reader.tensors:
        data = gguf.quants.dequantize(t.data, t.tensor_type)
        out[t.name] = (t.tensor_type.name, np.asarray(data, np.float32).reshape(
            tuple(int(d) for d in t.shape[::-1])))
    return reader, out


def field(reader, key):
    return reader.fields[key].contents()


def expected_rows(cfg, params, name, layer=None):
    rows = hf_rows(name, params[name], cfg, layer)
    return np.ascontiguousarray(rows)


def gguf_as_hf(cfg, name, rows):
    if name == "q":
        return hf_rows_from_pair_rows(rows, cfg.head_dim)
    if name == "k":
        return hf_rows_from_pair_rows(rows, cfg.head_dim)
    return rows


@pytest.mark.parametrize("ttype", ["tq2", "tq1"])
def test_ternary_export_holds_q_times_fp16_scale_in_llamacpp_layout(tmp_path, tok_dir, ttype):
    params, _ = make_checkpoint(tmp_path / "ck", CFG, tok_dir, seed=1, group=0)
    out = tmp_path / "m.gguf"
    report = export_gguf(tmp_path / "ck", out, ternary_type=ttype)
    assert report["path"] == str(out) and report["bytes"] == out.stat().st_size
    tq = TQ[ttype].name
    L = CFG.num_hidden_layers
    # q k v o gate up per layer, token_embd, output; ffn_down (640 inputs) falls back to F16
    assert report["tensor_types"] == {tq: 6 * L + 2, "F16": L, "F32": 2 * L + 1}
    assert [f["tensor"] for f in report["fallbacks"]] == [f"blk.{i}.ffn_down.weight"
                                                         for i in range(L)]
    assert all("640" in f["reason"] for f in report["fallbacks"])

    _, tensors = read_tensors(out)
    assert len(tensors) == 9 * L + 3
    for i in range(L):
        for name, short in GGUF_NAMES.items():
            kind, data = tensors[f"blk.{i}.{short}.weight"]
            want = expected_rows(CFG, params, name, i)
            if name.endswith("norm"):
                assert kind == "F32"
                np.testing.assert_array_equal(data, want)
                continue
            assert kind == (tq if name != "down" else "F16")
            # a ternary weight is q * s; the file holds q * fp16(s) = fp16(q * s)
            np.testing.assert_array_equal(gguf_as_hf(CFG, name, data),
                                          want.astype(np.float16).astype(np.float32),
                                          err_msg=f"layer {i} {name}")
    for gname, name in (("token_embd.weight", "embed"), ("output.weight", "lm_head")):
        kind, data = tensors[gname]
        assert kind == tq
        np.testing.assert_array_equal(
            data, expected_rows(CFG, params, name).astype(np.float16).astype(np.float32))
    np.testing.assert_array_equal(tensors["output_norm.weight"][1], params["final_norm"])


def test_metadata_and_tokenizer(tmp_path, tok_dir):
    make_checkpoint(tmp_path / "ck", CFG, tok_dir, seed=2, group=0)
    export_gguf(tmp_path / "ck", tmp_path / "m.gguf")
    reader = gguf.GGUFReader(tmp_path / "m.gguf")
    f = lambda key: field(reader, key)
    assert f("general.architecture") == "minicpm"
    assert f("general.file_type") == gguf.LlamaFileType.MOSTLY_TQ2_0
    ints = {"minicpm.context_length": 128, "minicpm.embedding_length": 256,
            "minicpm.block_count": 2, "minicpm.feed_forward_length": 640,
            "minicpm.attention.head_count": 4, "minicpm.attention.head_count_kv": 2,
            "minicpm.rope.dimension_count": 64, "minicpm.vocab_size": 520,
            "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2,
            "tokenizer.ggml.unknown_token_id": 0}
    assert {k: f(k) for k in ints} == ints
    floats = {"minicpm.embedding_scale": 10.0,
              "minicpm.residual_scale": 1.3 / math.sqrt(2),   # llama.cpp multiplies by it
              "minicpm.logit_scale": 256 / 64,                # llama.cpp divides by it
              "minicpm.rope.freq_base": 5000.0,
              "minicpm.attention.layer_norm_rms_epsilon": 1e-5}
    for k, v in floats.items():
        assert f(k) == pytest.approx(v, rel=1e-6), k
    assert "minicpm.rope.scaling.type" not in reader.fields
    assert f("tokenizer.ggml.model") == "llama"
    sp = Tokenizer(tok_dir).sp
    tokens, scores, types = (f("tokenizer.ggml.tokens"), f("tokenizer.ggml.scores"),
                             f("tokenizer.ggml.token_type"))
    assert len(tokens) == len(scores) == len(types) == 520
    assert tokens[:512] == [sp.id_to_piece(i) for i in range(512)]
    assert scores[:512] == pytest.approx([sp.get_score(i) for i in range(512)])
    assert tokens[512:] == [f"[PAD{i}]" for i in range(512, 520)]
    T = gguf.TokenType
    assert types[:3] == [T.UNKNOWN, T.CONTROL, T.CONTROL]
    assert types[3:259] == [T.BYTE] * 256 and set(types[259:512]) == {T.NORMAL}
    assert set(types[512:]) == {T.UNUSED}


def test_group_scales_tq_exact_per_output_row_or_f16_when_they_split_a_block(tmp_path, tok_dir):
    cfg = dataclasses.replace(CFG, intermediate_size=512, vocab_size=512)
    params, qs = make_checkpoint(tmp_path / "g256", cfg, tok_dir, seed=3, group=256)
    report = export_gguf(tmp_path / "g256", tmp_path / "g256.gguf", ternary_type="tq1")
    assert report["fallbacks"] == [] and report["group_size"] == 256
    _, tensors = read_tensors(tmp_path / "g256.gguf")
    for name in ("q", "down", "o"):
        kind, data = tensors[f"blk.1.{GGUF_NAMES[name]}.weight"]
        assert kind == "TQ1_0"
        q, s = qs[name]
        # groups of 256 input rows per output column: row o of the file, block b has s[b, o]
        want = (q[1] * np.repeat(s[1].astype(np.float16).astype(np.float32), 256, 0)).T
        np.testing.assert_array_equal(gguf_as_hf(cfg, name, data), want)

    params, _ = make_checkpoint(tmp_path / "g128", CFG, tok_dir, seed=4, group=128)
    report = export_gguf(tmp_path / "g128", tmp_path / "g128.gguf")
    assert report["tensor_types"] == {"F16": 7 * 2 + 2, "F32": 5}
    assert all("group_size 128" in f["reason"] for f in report["fallbacks"]
               if "ffn_down" not in f["tensor"])
    _, tensors = read_tensors(tmp_path / "g128.gguf")
    np.testing.assert_array_equal(
        gguf_as_hf(CFG, "k", tensors["blk.0.attn_k.weight"][1]),
        expected_rows(CFG, params, "k", 0).astype(np.float16).astype(np.float32))


ROPE_CFG = dataclasses.replace(
    CFG, tie_word_embeddings=True, max_position_embeddings=256,
    rope_scaling=RopeScaling(long_factor=tuple(1.0 + 0.1 * j for j in range(32)),
                             short_factor=tuple(1.0 + 0.05 * j for j in range(32)),
                             original_max_position_embeddings=128))


@pytest.mark.parametrize("float_type", ["f32", "f16"])
def test_float_export_with_longrope_and_tied_head(tmp_path, tok_dir, float_type):
    params, _ = make_checkpoint(tmp_path / "ck", ROPE_CFG, tok_dir, seed=5)
    report = export_gguf(tmp_path / "ck", tmp_path / "m.gguf", float_type=float_type)
    F = float_type.upper()
    assert report["ternary"] is False and report["fallbacks"] == []
    n_float, n_f32 = 7 * 2 + 1, 2 * 2 + 1 + 2        # matrices + embedding; norms + factors
    want = {"F32": n_float + n_f32} if F == "F32" else {"F16": n_float, "F32": n_f32}
    assert report["tensor_types"] == want
    reader, tensors = read_tensors(tmp_path / "m.gguf")
    assert "output.weight" not in tensors                    # tied: llama.cpp reuses token_embd
    cast = (lambda x: x) if float_type == "f32" else (
        lambda x: x.astype(np.float16).astype(np.float32))
    np.testing.assert_array_equal(tensors["token_embd.weight"][1], cast(params["embed"]))
    for name in ("q", "k", "o", "down"):
        np.testing.assert_array_equal(
            gguf_as_hf(ROPE_CFG, name, tensors[f"blk.1.{GGUF_NAMES[name]}.weight"][1]),
            cast(expected_rows(ROPE_CFG, params, name, 1)))
    # 256 > 128 original positions: the official model uses the long factors at every length
    np.testing.assert_array_equal(tensors["rope_factors_long.weight"][1],
                                  np.float32(ROPE_CFG.rope_scaling.long_factor))
    np.testing.assert_array_equal(tensors["rope_factors_short.weight"][1],
                                  np.float32(ROPE_CFG.rope_scaling.long_factor))
    assert field(reader, "minicpm.rope.scaling.type") == "longrope"
    assert field(reader, "minicpm.rope.scaling.attn_factor") == pytest.approx(
        math.sqrt(1 + math.log(2) / math.log(128)), rel=1e-6)


def rms(x, w, eps):
    return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps) * w


def llamacpp_style_forward(path, ids):
    """Logits of ``ids`` from the GGUF file alone, computed as llama.cpp's minicpm graph does
    (granite's graph: scaled embedding, residual_scale on each branch, pairwise RoPE with
    frequency factors and attn_factor, logits divided by logit_scale), in float64."""
    reader, t = read_tensors(path)
    f = lambda key: field(reader, key)
    W = {k: v[1].astype(np.float64) for k, v in t.items()}
    n_head, n_kv = f("minicpm.attention.head_count"), f("minicpm.attention.head_count_kv")
    eps, base = f("minicpm.attention.layer_norm_rms_epsilon"), f("minicpm.rope.freq_base")
    d = f("minicpm.embedding_length") // n_head
    T = len(ids)
    theta = np.arange(T)[:, None] * base ** (-np.arange(0, d, 2) / d)       # [T, d/2]
    mscale = 1.0
    if "rope_factors_short.weight" in W:   # short: the context here is below context_length
        theta = theta / W["rope_factors_short.weight"]
        mscale = f("minicpm.rope.scaling.attn_factor")
    cos, sin = np.cos(theta) * mscale, np.sin(theta) * mscale

    def rope(x):                           # [T, n, d], pairs (2j, 2j+1)
        a, b = x[..., 0::2], x[..., 1::2]
        out = np.empty_like(x)
        out[..., 0::2] = a * cos[:, None] - b * sin[:, None]
        out[..., 1::2] = a * sin[:, None] + b * cos[:, None]
        return out

    r = f("minicpm.residual_scale")
    h = W["token_embd.weight"][ids] * f("minicpm.embedding_scale")
    mask = np.tril(np.ones((T, T), bool))
    for i in range(f("minicpm.block_count")):
        p = lambda s: W[f"blk.{i}.{s}.weight"]
        x = rms(h, p("attn_norm"), eps)
        q = rope((x @ p("attn_q").T).reshape(T, n_head, d))
        k = rope((x @ p("attn_k").T).reshape(T, n_kv, d))
        v = (x @ p("attn_v").T).reshape(T, n_kv, d)
        k, v = np.repeat(k, n_head // n_kv, 1), np.repeat(v, n_head // n_kv, 1)
        s = np.einsum("qnd,knd->nqk", q, k) / math.sqrt(d)
        s = np.where(mask, s, -np.inf)
        a = np.exp(s - s.max(-1, keepdims=True))
        a /= a.sum(-1, keepdims=True)
        o = np.einsum("nqk,knd->qnd", a, v).reshape(T, -1)
        h = h + r * (o @ p("attn_output").T)
        x = rms(h, p("ffn_norm"), eps)
        g, u = x @ p("ffn_gate").T, x @ p("ffn_up").T
        h = h + r * ((g / (1 + np.exp(-g)) * u) @ p("ffn_down").T)
    x = rms(h, W["output_norm.weight"], eps)
    head = W.get("output.weight", W["token_embd.weight"])
    return (x @ head.T) / f("minicpm.logit_scale")


@pytest.mark.parametrize("cfg,group", [(ROPE_CFG, None), (CFG, 0)], ids=["float", "ternary"])
def test_file_read_as_llamacpp_computes_mcpm_logits(tmp_path, tok_dir, cfg, group):
    from mcpm.api import from_pretrained
    params, _ = make_checkpoint(tmp_path / "ck", cfg, tok_dir, seed=6, group=group)
    export_gguf(tmp_path / "ck", tmp_path / "m.gguf")
    ids = np.array([1, 37, 200, 5, 401, 77, 12, 300, 9])
    want = np.asarray(from_pretrained(tmp_path / "ck")(ids[None]))[0]
    got = llamacpp_style_forward(tmp_path / "m.gguf", ids)
    err = np.abs(got - want).max() / np.abs(want).max()
    # float: the same weights; ternary: scales rounded to fp16 (2^-11 relative)
    assert err < (1e-5 if group is None else 3e-3), err


def test_official_model_through_the_file_gives_the_official_logits(tmp_path, official_case):
    """The official PyTorch code's logits (LongRoPE with the long factors and magnitude scale,
    or the short ones; tied or untied head) from the GGUF of its HF directory."""
    hf = tmp_path / "hf"
    shutil.copytree(official_case / "hf", hf)
    rng = np.random.default_rng(0)               # few characters: a tokenizer below 320 pieces
    words = ["".join(rng.choice(list("abcdefgh"), rng.integers(2, 7))) for _ in range(200)]
    (tmp_path / "text.txt").write_text("\n".join(
        " ".join(rng.choice(words, 12)) for _ in range(500)))
    train_tokenizer([tmp_path / "text.txt"], hf, vocab_size=300)
    export_gguf(hf, tmp_path / "m.gguf")
    ids, want = np.load(official_case / "ids.npy"), np.load(official_case / "logits.npy")
    for row in range(ids.shape[0]):
        got = llamacpp_style_forward(tmp_path / "m.gguf", ids[row])
        err = np.linalg.norm(got - want[row]) / np.linalg.norm(want[row])
        assert err < 1e-5, (row, err)


def test_refusals_and_nothing_left_behind(tmp_path, tok_dir, monkeypatch):
    make_checkpoint(tmp_path / "ck", CFG, tok_dir, seed=7, group=0)
    out = tmp_path / "out" / "m.gguf"
    out.parent.mkdir()
    out.write_bytes(b"old")
    with pytest.raises(FileExistsError, match="overwrite"):
        export_gguf(tmp_path / "ck", out)
    with pytest.raises(GGUFExportError, match="ternary_type"):
        export_gguf(tmp_path / "ck", out, ternary_type="q4", overwrite=True)
    calls = []

    def failing(self, tensor, *a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("disk full")
        return real(self, tensor, *a, **k)

    real = gguf.GGUFWriter.write_tensor_data
    monkeypatch.setattr(gguf.GGUFWriter, "write_tensor_data", failing)
    with pytest.raises(RuntimeError, match="disk full"):
        export_gguf(tmp_path / "ck", out, overwrite=True)
    assert sorted(p.name for p in out.parent.iterdir()) == ["m.gguf"]
    assert out.read_bytes() == b"old"
    monkeypatch.setattr(gguf.GGUFWriter, "write_tensor_data", real)
    export_gguf(tmp_path / "ck", out, overwrite=True)
    assert gguf.GGUFReader(out).fields["general.architecture"].contents() == "minicpm"

    (tmp_path / "ck" / "tokenizer.model").unlink()
    with pytest.raises(GGUFExportError, match="no tokenizer.model"):
        export_gguf(tmp_path / "ck", tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists()


def test_a_float_checkpoint_claiming_to_be_ternary_is_refused(tmp_path, tok_dir):
    params, _ = random_params(CFG, 8, 0, ())
    save_checkpoint(tmp_path / "ck", CFG, params, aux_dir=tok_dir, extra_files={
        "quant.json": json.dumps({"method": "ternary", "group_size": 0, "tensors": ["q"]})})
    with pytest.raises(QuantError, match="not a ternary matrix"):
        export_gguf(tmp_path / "ck", tmp_path / "m.gguf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]
