"""A checkpoint as one GGUF file for llama.cpp (architecture ``minicpm``).

What llama.cpp does with a ``minicpm`` file, and so what is written (read from llama.cpp's
``src/models/minicpm.cpp``, ``src/models/granite.cpp``, ``src/llama-graph.cpp`` and its
``convert_hf_to_gguf`` MiniCPM converter):

* the embedding is multiplied by ``minicpm.embedding_scale`` (= ``scale_emb``);
* each attention and FFN output is multiplied by ``minicpm.residual_scale`` before it is added
  to the residual, so the key holds the whole factor ``scale_depth / sqrt(L)``;
* the logits are divided by ``minicpm.logit_scale`` (= ``hidden_size / dim_model_base``, mcpm's
  ``width_mult``);
* RoPE is llama.cpp's NORM kind (rotating consecutive pairs), while MiniCPM rotates the halves
  of each head: q and k rows are permuted per head (row ``2j + c`` holds the HF row
  ``c * D/2 + j``) so that both rotate the same pairs, as the HF converter does;
* LongRoPE: ``rope_factors_long`` / ``rope_factors_short`` divide the frequencies and
  ``rope.scaling.attn_factor`` multiplies cos and sin. llama.cpp picks long or short by the
  context it is given; the official model picks once, by ``max_position_embeddings``
  (:func:`mcpm.model.layers.rope_factors`), so both tensors hold the factors the official model
  uses and the attention factor is its magnitude scale: llama.cpp then matches it at any
  context length.

Tensors are stored row-major as ``[out, in]`` (GGUF ``ne = [in, out]``): the matrix views of
:func:`mcpm.quant.qat.as_matrices` (``[in, out]``) transposed. In a ternary checkpoint the
quantized matrices become TQ2_0 or TQ1_0: blocks of 256 weights along a row (the input axis)
with one fp16 scale each. Such a block holds ``q * scale`` exactly (up to the scale's fp16
rounding) when all its weights share one mcpm scale: always for one scale per matrix, and for
groups of a multiple of 256 input rows. A matrix whose input size is not a multiple of 256, or
whose groups split a block, is written as F16 instead: the same values ``q * fp16(scale)``,
named in the report's ``fallbacks``. Norms and RoPE factors are F32; the embedding, an untied
head and a float model's matrices are F32 by default (``float_type="f16"`` halves them): the
file then holds exactly the checkpoint's model.
"""
from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path
from typing import Iterator, NamedTuple, Optional

import numpy as np

from mcpm.quant.qat import read_quant_info, recover_ternary
from mcpm.quant.ternary import QuantError

ARCH = "minicpm"
TERNARY_TYPES = ("tq2", "tq1")
FLOAT_TYPES = ("f32", "f16")
BLOCK = 256  # weights per TQ1_0 / TQ2_0 block (ggml's QK_K)

_LAYER_NAMES = {"attn_norm": "attn_norm", "q": "attn_q", "k": "attn_k", "v": "attn_v",
                "o": "attn_output", "mlp_norm": "ffn_norm", "gate": "ffn_gate", "up": "ffn_up",
                "down": "ffn_down"}


class GGUFExportError(QuantError):
    """A checkpoint that cannot be written as GGUF (no tokenizer, a bad record or option)."""


class _Entry(NamedTuple):
    gguf_name: str
    param: str            # mcpm parameter name ("" for the RoPE factors)
    layer: Optional[int]
    qtype: object         # gguf.GGMLQuantizationType
    shape: tuple[int, ...]  # row-major, [out, in] for matrices
    ternary: bool


def _gguf():
    import gguf
    return gguf


def export_gguf(ckpt_dir: str | Path, out_path: str | Path, *, ternary_type: str = "tq2",
                float_type: str = "f32", overwrite: bool = False,
                progress: bool = False) -> dict:
    """Write the model in ``ckpt_dir`` (an mcpm checkpoint, ternary when it has quant.json, or
    an HF directory) with its ``tokenizer.model`` to the GGUF file ``out_path``.

    ``ternary_type``: ``tq2`` (TQ2_0, 2.06 bits per weight) or ``tq1`` (TQ1_0, 1.69).
    ``float_type``: ``f32`` or ``f16`` for the tensors that are not ternary (norms stay F32).
    The file is written beside ``out_path`` under a temporary name and renamed into place, so a
    failure leaves nothing behind; an existing ``out_path`` is refused unless ``overwrite``.

    Returns ``{"path", "bytes", "ternary", "group_size", "tensor_types": {type: count},
    "fallbacks": [{"tensor", "type", "reason"}]}``.
    """
    from mcpm._files import atomic_write
    from mcpm.api import load_params
    from mcpm.hf import check_output_dir

    gguf = _gguf()
    if ternary_type not in TERNARY_TYPES:
        raise GGUFExportError(f"ternary_type {ternary_type!r} is not one of {list(TERNARY_TYPES)}")
    if float_type not in FLOAT_TYPES:
        raise GGUFExportError(f"float_type {float_type!r} is not one of {list(FLOAT_TYPES)}")
    ckpt_dir, out_path = Path(ckpt_dir), Path(out_path)
    check_output_dir(out_path, overwrite)
    if out_path.is_dir():
        raise FileExistsError(f"{out_path} is a directory; give the path of the .gguf file")
    info = read_quant_info(ckpt_dir)
    vocab_path = ckpt_dir / "tokenizer.model"
    if not vocab_path.is_file():
        raise GGUFExportError(
            f"{ckpt_dir} has no tokenizer.model, and a GGUF file must carry its tokenizer: copy "
            "the model's SentencePiece tokenizer.model into the checkpoint directory")
    cfg, _, params = load_params(ckpt_dir)
    vocab = _vocab(ckpt_dir, cfg)

    qt = gguf.GGMLQuantizationType
    ttype = {"tq2": qt.TQ2_0, "tq1": qt.TQ1_0}[ternary_type]
    ftype = {"f32": qt.F32, "f16": qt.F16}[float_type]
    entries, fallbacks = _plan(cfg, params, info, ttype, ftype)

    def write(tmp: Path) -> None:
        writer = gguf.GGUFWriter(tmp, ARCH)
        try:
            _metadata(writer, cfg, vocab, info is not None, ternary_type, float_type)
            for e in entries:
                block, type_size = gguf.GGML_QUANT_SIZES[e.qtype]
                nbytes = math.prod(e.shape) // block * type_size
                writer.add_tensor_info(e.gguf_name, e.shape, np.dtype(np.float32), nbytes,
                                       raw_dtype=e.qtype)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            todo = entries
            if progress:
                from tqdm import tqdm
                todo = tqdm(entries, desc="gguf", unit="tensor")
            for e, data in zip(todo, _tensors(entries, cfg, params, info)):
                writer.write_tensor_data(data)
        finally:
            writer.close()

    atomic_write(out_path, write)
    return {"path": str(out_path), "bytes": out_path.stat().st_size,
            "ternary": info is not None,
            "group_size": None if info is None else info["group_size"],
            "tensor_types": dict(Counter(e.qtype.name for e in entries)),
            "fallbacks": fallbacks}


# --------------------------------------------------------------------------------------------
# which tensors, in which types
# --------------------------------------------------------------------------------------------

def tq_unfit_reason(in_dim: int, group_size: int) -> Optional[str]:
    """Why a ternary matrix with ``in_dim`` inputs and mcpm ``group_size`` cannot be an exact
    TQ tensor (None when it can): each 256-weight block along the input axis has one scale."""
    if in_dim % BLOCK:
        return (f"its input size {in_dim} is not a multiple of the {BLOCK}-weight TQ block")
    if group_size and group_size % BLOCK:
        return (f"group_size {group_size} puts several scales in one {BLOCK}-weight TQ block, "
                "which has one")
    return None


def _plan(cfg, params, info, ttype, ftype) -> tuple[list[_Entry], list[dict]]:
    gguf = _gguf()
    F32 = gguf.GGMLQuantizationType.F32
    F16 = gguf.GGMLQuantizationType.F16
    ternary = set(info["tensors"]) if info is not None else set()
    unknown = sorted(ternary - set(params))
    if unknown:
        raise GGUFExportError(f"quant.json lists tensors the model does not have: {unknown}")
    group = info["group_size"] if info is not None else 0
    fallbacks: list[dict] = []

    def matrix(gguf_name, name, layer):
        w = params[name]
        n_in, n_out = _matrix(name, w if layer is None else w[layer]).shape
        if name not in ternary:
            return _Entry(gguf_name, name, layer, ftype, (n_out, n_in), False)
        reason = tq_unfit_reason(n_in, group)
        if reason is None:
            return _Entry(gguf_name, name, layer, ttype, (n_out, n_in), True)
        fallbacks.append({"tensor": gguf_name, "type": "F16", "reason": reason})
        return _Entry(gguf_name, name, layer, F16, (n_out, n_in), True)

    H = cfg.hidden_size
    entries = [matrix("token_embd.weight", "embed", None)]
    if cfg.rope_scaling is not None:
        half = (cfg.head_dim // 2,)
        entries += [_Entry("rope_factors_long.weight", "", None, F32, half, False),
                    _Entry("rope_factors_short.weight", "", None, F32, half, False)]
    for i in range(cfg.num_hidden_layers):
        for name, short in _LAYER_NAMES.items():
            gname = f"blk.{i}.{short}.weight"
            if name.endswith("norm"):
                entries.append(_Entry(gname, name, i, F32, (H,), False))
            else:
                entries.append(matrix(gname, name, i))
    entries.append(_Entry("output_norm.weight", "final_norm", None, F32, (H,), False))
    if not cfg.tie_word_embeddings:
        entries.append(matrix("output.weight", "lm_head", None))
    return entries, fallbacks


def _matrix(name: str, w: np.ndarray) -> np.ndarray:
    """One matrix of parameter ``name`` (its layer already picked) as ``[in, out]``: the view
    that :func:`mcpm.quant.qat.as_matrices` quantizes, in numpy."""
    if name == "embed":
        return w.T
    if name == "lm_head":
        return w
    n_in = 2 if name == "o" else 1
    return w.reshape(math.prod(w.shape[:n_in]), -1)


def rope_permute(w_rows: np.ndarray, n_heads: int) -> np.ndarray:
    """Rows ``[n_heads * D, in]`` of q or k reordered for llama.cpp's pairwise RoPE: within
    each head, row ``2j + c`` is the input row ``c * D/2 + j`` (rotate-half pairs
    ``(j, j + D/2)`` become consecutive)."""
    d = w_rows.shape[0] // n_heads
    return (w_rows.reshape(n_heads, 2, d // 2, -1).swapaxes(1, 2)
            .reshape(w_rows.shape))


def _tensors(entries, cfg, params, info) -> Iterator[np.ndarray]:
    """Each entry's data, in order, one tensor in memory at a time."""
    gguf = _gguf()
    group = info["group_size"] if info is not None else 0
    from mcpm.model.layers import rope_factors
    factors, _ = rope_factors(cfg)
    for e in entries:
        if not e.param:
            yield np.asarray(factors, np.float32)
            continue
        w = params[e.param]
        if e.param.endswith("norm"):
            yield np.ascontiguousarray(w if e.layer is None else w[e.layer], np.float32)
            continue
        m = np.asarray(_matrix(e.param, w if e.layer is None else w[e.layer]), np.float32)
        where = e.gguf_name.removesuffix(".weight")
        if e.ternary:
            recover_ternary(m, group, name=f"{e.param} ({where})")        # raises unless q*s
        rows = m.T                                                          # [out, in]
        if e.param == "q":
            rows = rope_permute(rows, cfg.num_attention_heads)
        elif e.param == "k":
            rows = rope_permute(rows, cfg.num_key_value_heads)
        yield gguf.quants.quantize(np.ascontiguousarray(rows), e.qtype)


# --------------------------------------------------------------------------------------------
# metadata and tokenizer
# --------------------------------------------------------------------------------------------

class _Vocab(NamedTuple):
    tokens: list[bytes]
    scores: list[float]
    types: list[int]
    unk_id: int
    add_space_prefix: Optional[bool]
    chat_template: Optional[str]


def _vocab(ckpt_dir: Path, cfg) -> _Vocab:
    """The SentencePiece model as llama.cpp's ``llama`` tokenizer, padded to the model's
    vocabulary with unused ``[PADi]`` pieces; ``tokenizer_config.json``'s added tokens (when
    present) are laid over it, special ones as control tokens."""
    gguf = _gguf()
    from mcpm.tokenizer import Tokenizer
    T = gguf.TokenType
    sp = Tokenizer(ckpt_dir).sp
    n, V = sp.get_piece_size(), cfg.vocab_size
    if n > V:
        raise GGUFExportError(f"{ckpt_dir / 'tokenizer.model'} has {n} pieces but the model "
                              f"has only {V} embeddings: it is not this model's tokenizer")
    tokens = [f"[PAD{i}]".encode() for i in range(V)]
    scores = [-10000.0] * V
    types = [int(T.UNUSED)] * V
    for i in range(n):
        tokens[i] = sp.id_to_piece(i).encode("utf-8")
        scores[i] = float(sp.get_score(i))
        kind = (T.UNKNOWN if sp.is_unknown(i) else T.CONTROL if sp.is_control(i)
                else T.UNUSED if sp.is_unused(i) else T.BYTE if sp.is_byte(i) else T.NORMAL)
        types[i] = int(kind)
    template = None
    config_file = ckpt_dir / "tokenizer_config.json"
    if config_file.is_file():
        try:
            tok_cfg = json.loads(config_file.read_text())
        except (OSError, ValueError) as e:
            raise GGUFExportError(f"{config_file}: cannot read it ({e})") from None
        for key, added in (tok_cfg.get("added_tokens_decoder") or {}).items():
            i = int(key)
            if 0 <= i < V:
                if i >= n or tokens[i] != added["content"].encode("utf-8"):
                    tokens[i] = added["content"].encode("utf-8")
                    scores[i] = -1000.0
                types[i] = int(T.CONTROL if added.get("special") else T.USER_DEFINED)
        if isinstance(tok_cfg.get("chat_template"), str):
            template = tok_cfg["chat_template"]
    space_prefix = None
    try:
        from sentencepiece import sentencepiece_model_pb2
        proto = sentencepiece_model_pb2.ModelProto()
        proto.ParseFromString(sp.serialized_model_proto())
        space_prefix = bool(proto.normalizer_spec.add_dummy_prefix)
    except ImportError:  # protobuf missing: llama.cpp's default (a space prefix) applies
        pass
    return _Vocab(tokens, scores, types, sp.unk_id(), space_prefix, template)


def _metadata(writer, cfg, vocab: _Vocab, ternary: bool, ternary_type: str,
              float_type: str) -> None:
    gguf = _gguf()
    from mcpm.model.layers import rope_factors
    F = gguf.LlamaFileType
    if ternary:
        file_type = F.MOSTLY_TQ2_0 if ternary_type == "tq2" else F.MOSTLY_TQ1_0
    else:
        file_type = F.ALL_F32 if float_type == "f32" else F.MOSTLY_F16
    writer.add_type("model")
    writer.add_file_type(int(file_type))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_dimension_count(cfg.head_dim)
    writer.add_rope_freq_base(float(cfg.rope_theta))
    writer.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
    writer.add_embedding_scale(float(cfg.scale_emb))
    writer.add_residual_scale(float(cfg.residual_scale))
    writer.add_logit_scale(float(cfg.width_mult))
    if cfg.rope_scaling is not None:
        _, magnitude = rope_factors(cfg)
        writer.add_rope_scaling_type(gguf.RopeScalingType.LONGROPE)
        writer.add_rope_scaling_attn_factors(float(magnitude))
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(vocab.tokens)
    writer.add_token_scores(vocab.scores)
    writer.add_token_types(vocab.types)
    writer.add_bos_token_id(cfg.bos_token_id)
    writer.add_eos_token_id(cfg.eos_token_id[0])
    if len(cfg.eos_token_id) > 1:     # MiniCPM4's second eos is <|im_end|>: the end of a turn
        writer.add_eot_token_id(cfg.eos_token_id[1])
    if vocab.unk_id >= 0:
        writer.add_unk_token_id(vocab.unk_id)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    if vocab.add_space_prefix is not None:
        writer.add_add_space_prefix(vocab.add_space_prefix)
    if vocab.chat_template:
        writer.add_chat_template(vocab.chat_template)
