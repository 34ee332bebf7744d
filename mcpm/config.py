"""Typed, validated configuration: frozen dataclasses, YAML files and ``key=value`` overrides.

One system for every layer of mcpm. A config is a tree of frozen dataclasses; YAML files and
command-line overrides (``model.hidden_size=256``, dotted paths, values parsed as YAML) are
merged into plain dicts first and converted once by :func:`from_dict`, which checks every key and
type and names the offending key (with the closest valid spelling) when something is wrong.

This module imports nothing else from mcpm: every layer may read configs.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import types
import typing
import warnings
from pathlib import Path
from typing import Any, Literal, Optional, Sequence, Union

import yaml


class UserError(Exception):
    """Base of the errors a user can fix (bad config, file, checkpoint, data): the CLI prints
    the message and exits 2 instead of showing a traceback."""


class ConfigError(UserError, ValueError):
    """A configuration value or key is invalid. The message names the key and suggests a fix."""


# --------------------------------------------------------------------------------------------
# Config dataclasses
# --------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """LongRoPE as in the official ``rope_scaling`` block (``rope_type: longrope``)."""

    long_factor: tuple[float, ...]
    short_factor: tuple[float, ...]
    original_max_position_embeddings: int
    rope_type: Literal["longrope"] = "longrope"

    def __post_init__(self):
        if len(self.long_factor) != len(self.short_factor):
            raise ConfigError(
                f"rope_scaling.long_factor has {len(self.long_factor)} values but "
                f"rope_scaling.short_factor has {len(self.short_factor)}; both need head_dim/2")
        if self.original_max_position_embeddings <= 0:
            raise ConfigError("rope_scaling.original_max_position_embeddings must be positive, "
                              f"got {self.original_max_position_embeddings}")
        for name in ("long_factor", "short_factor"):
            if any(not (f > 0) for f in getattr(self, name)):
                raise ConfigError(f"rope_scaling.{name} must hold positive numbers")


@dataclasses.dataclass(frozen=True)
class SparseConfig:
    """InfLLM v2 settings, with the official ``sparse_config`` keys (spec section 3)."""

    kernel_size: int = 32
    kernel_stride: int = 16
    init_blocks: int = 1
    block_size: int = 64
    window_size: int = 2048
    topk: int = 64
    use_nope: bool = False
    dense_len: int = 8192
    # mcpm-only (never written to a config.json while at their defaults): "A" is the released
    # MiniCPM4-8B's selection (window outside the top-k), "B" MiniCPM4.1's / the InfLLM-V2
    # paper's (topk counts the whole budget, init and window blocks forced into it)
    variant: Literal["A", "B"] = "A"
    # stage-1 softmax normaliser from coarse kernels (4x kernel size and stride), variant B's
    # "LSE approximation"
    lse_approx: bool = False

    def __post_init__(self):
        for name in ("kernel_size", "kernel_stride", "block_size", "window_size", "topk"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"sparse_config.{name} must be positive, got {getattr(self, name)}")
        if self.init_blocks < 0:
            raise ConfigError(f"sparse_config.init_blocks must be >= 0, got {self.init_blocks}")
        if self.kernel_size != 2 * self.kernel_stride:
            raise ConfigError(
                f"sparse_config.kernel_size ({self.kernel_size}) must be 2 x kernel_stride "
                f"({self.kernel_stride}), as in the official kernels")
        if self.block_size % self.kernel_stride:
            raise ConfigError(f"sparse_config.block_size ({self.block_size}) must be a multiple of "
                              f"kernel_stride ({self.kernel_stride})")
        if self.window_size % self.block_size:
            raise ConfigError(f"sparse_config.window_size ({self.window_size}) must be a multiple "
                              f"of block_size ({self.block_size})")
        if self.variant not in ("A", "B"):
            raise ConfigError(f"sparse_config.variant must be 'A' (MiniCPM4, the default) or 'B' "
                              f"(MiniCPM4.1 / InfLLM-V2 paper), got {self.variant!r}")
        if self.dense_len < -1:
            raise ConfigError(f"sparse_config.dense_len must be -1 (always sparse) or >= 0, "
                              f"got {self.dense_len}")


DTypeName = Literal["float32", "bfloat16", "float16"]
RematPolicy = Literal["none", "full", "dots", "dots_no_batch"]
AttentionImpl = Literal["auto", "einsum", "flash", "cudnn", "splash"]
MatmulPrecision = Literal["highest", "high", "default"]
SparseAttentionImpl = Literal["auto", "xla", "pallas"]


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """A MiniCPM4 model. Field names follow the official HF ``config.json`` where one exists.

    The mcpm-only fields (``param_dtype``, ``compute_dtype``, ``remat``, ``mup_scale_embedding``,
    ``attention_impl``, ``sparse_attention_impl``, ``matmul_precision``) say how to run the
    model, not what it is, and never reach a config.json.

    ``attention_impl`` picks the dense attention of calls without a KV cache:
    ``einsum`` (the whole score array; short sequences), ``flash`` (tiled online softmax in
    plain JAX, memory linear in T, every backend), ``cudnn`` (NVIDIA GPUs, bfloat16/float16,
    calls without segment ids), ``splash`` (the Pallas TPU kernel), or ``auto``: on CPU einsum
    up to 64 keys and flash beyond, on GPU cudnn where it applies and flash otherwise (packed
    rows, float32), on TPU splash. ``sparse_attention_impl`` picks InfLLM v2's: ``xla``
    (gathered plain JAX), ``pallas`` (TPU kernels; interpreted on CPU, refused on GPU) or
    ``auto`` (pallas on TPU, xla elsewhere). See :mod:`mcpm.model.attention`.

    ``matmul_precision`` applies to float32 compute: ``highest`` (the default) multiplies in
    full float32 on every backend, as the official model does; ``high`` and ``default`` let GPUs
    use TF32 and TPUs bfloat16 passes (3 and 1), faster and about 1e-3 relative off. bfloat16
    compute is not affected.
    """

    vocab_size: int = 73448
    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    num_key_value_heads: int = 2
    max_position_embeddings: int = 32768
    rope_theta: float = 10000.0
    rope_scaling: Optional[RopeScaling] = None
    rms_norm_eps: float = 1e-6
    scale_emb: float = 12.0
    scale_depth: float = 1.4
    dim_model_base: float = 256
    initializer_range: float = 0.1
    tie_word_embeddings: bool = True
    bos_token_id: int = 1
    eos_token_id: tuple[int, ...] = (2, 73440)
    sparse_config: Optional[SparseConfig] = None
    # How to run it (mcpm only).
    param_dtype: DTypeName = "float32"
    compute_dtype: DTypeName = "float32"
    remat: RematPolicy = "none"
    mup_scale_embedding: bool = False
    attention_impl: AttentionImpl = "auto"
    sparse_attention_impl: SparseAttentionImpl = "auto"
    matmul_precision: MatmulPrecision = "highest"

    def __post_init__(self):
        for name, tp in (("attention_impl", AttentionImpl),
                         ("sparse_attention_impl", SparseAttentionImpl),
                         ("matmul_precision", MatmulPrecision)):
            choices = typing.get_args(tp)
            if getattr(self, name) not in choices:
                raise ConfigError(f"model.{name}: {getattr(self, name)!r} is not one of "
                                  f"{list(choices)}" + _suggest(str(getattr(self, name)), choices))
        positive = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                    "num_attention_heads", "num_key_value_heads", "max_position_embeddings",
                    "rope_theta", "rms_norm_eps", "dim_model_base", "initializer_range")
        for name in positive:
            if not getattr(self, name) > 0:
                raise ConfigError(f"model.{name} must be positive, got {getattr(self, name)!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"model.hidden_size ({self.hidden_size}) must be divisible by "
                f"model.num_attention_heads ({self.num_attention_heads})")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"model.num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"model.num_key_value_heads ({self.num_key_value_heads})")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim = hidden_size / num_attention_heads = {self.head_dim} "
                              "must be even for RoPE")
        if self.rope_scaling is not None and len(self.rope_scaling.long_factor) != self.head_dim // 2:
            raise ConfigError(
                f"model.rope_scaling has {len(self.rope_scaling.long_factor)} factors but "
                f"head_dim/2 = {self.head_dim // 2} are needed (head_dim = {self.head_dim})")
        if not self.eos_token_id:
            raise ConfigError("model.eos_token_id needs at least one id")
        for tok in (self.bos_token_id, *self.eos_token_id):
            if not 0 <= tok < self.vocab_size:
                raise ConfigError(f"token id {tok} (bos/eos) is outside the vocabulary "
                                  f"[0, {self.vocab_size})")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def num_groups(self) -> int:
        """G: query heads per key/value head."""
        return self.num_attention_heads // self.num_key_value_heads

    @property
    def width_mult(self) -> float:
        """muP width multiplier m = hidden_size / dim_model_base (also the logit divisor)."""
        return self.hidden_size / self.dim_model_base

    @property
    def residual_scale(self) -> float:
        return self.scale_depth / math.sqrt(self.num_hidden_layers)

    def num_params(self) -> int:
        h, i, v, d = self.hidden_size, self.intermediate_size, self.vocab_size, self.head_dim
        attn = h * d * (2 * self.num_attention_heads + 2 * self.num_key_value_heads)
        per_layer = attn + 3 * h * i + 2 * h
        return v * h * (1 if self.tie_word_embeddings else 2) + self.num_hidden_layers * per_layer + h


@dataclasses.dataclass(frozen=True)
class GenerateConfig:
    """Defaults for ``mcpm generate``; every field can be overridden on the command line."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self):
        if self.max_new_tokens < 0:
            raise ConfigError(f"generate.max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ConfigError(f"generate.temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ConfigError(f"generate.top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"generate.top_p must be in (0, 1], got {self.top_p}")


DecayShape = Literal["exponential", "linear", "cosine", "1-sqrt"]


@dataclasses.dataclass(frozen=True)
class ScheduleConfig:
    """WSD learning rate (training spec section 1): linear warm-up to ``peak_lr`` over
    ``warmup_steps``, constant, then a decay over the last ``decay_fraction`` of the run.

    ``exponential`` halves the lr every ``half_life_steps`` (MiniCPM 1/2); ``linear``, ``cosine``
    and ``1-sqrt`` end at ``final_fraction * peak_lr``.
    """

    peak_lr: float = 1e-2
    warmup_steps: int = 100
    decay_fraction: float = 0.1
    decay_shape: DecayShape = "exponential"
    half_life_steps: int = 5000
    final_fraction: float = 0.0

    def __post_init__(self):
        if not self.peak_lr > 0:
            raise ConfigError(f"schedule.peak_lr must be positive, got {self.peak_lr}")
        if self.warmup_steps < 0:
            raise ConfigError(f"schedule.warmup_steps must be >= 0, got {self.warmup_steps}")
        if not 0 <= self.decay_fraction <= 1:
            raise ConfigError(f"schedule.decay_fraction must be in [0, 1], got {self.decay_fraction}")
        if self.half_life_steps <= 0:
            raise ConfigError(f"schedule.half_life_steps must be positive, got "
                              f"{self.half_life_steps}")
        if not 0 <= self.final_fraction <= 1:
            raise ConfigError(f"schedule.final_fraction must be in [0, 1], got {self.final_fraction}")


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """AdamW with MiniCPM's muP learning rates (training spec section 2).

    With ``mup``, hidden matrices (q, k, v, o, gate, up, down) learn at ``lr / m``
    (m = hidden_size / dim_model_base); embeddings, the untied head and norms at ``lr``
    (``mup_embedding_lr`` = "scaled" gives the embeddings ``lr / m`` too). Weight decay is
    decoupled (AdamW) and skips the norms; ``clip_norm`` <= 0 turns clipping off.
    """

    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    clip_norm: float = 1.0
    mup: bool = True
    mup_embedding_lr: Literal["unscaled", "scaled"] = "unscaled"

    def __post_init__(self):
        for name in ("b1", "b2"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(f"optimizer.{name} must be in [0, 1), got {getattr(self, name)}")
        if not self.eps > 0:
            raise ConfigError(f"optimizer.eps must be positive, got {self.eps}")
        if self.weight_decay < 0:
            raise ConfigError(f"optimizer.weight_decay must be >= 0, got {self.weight_decay}")


DataSourceKind = Literal["builtin", "tfds", "files"]
FileFormat = Literal["auto", "txt", "jsonl", "parquet", "arrayrecord"]


@dataclasses.dataclass(frozen=True)
class DataSourceConfig:
    """One source of training text (checked by :class:`DataConfig`, which knows its index).

    ``kind``:

    - ``builtin``: mcpm's built-in corpus (the Python standard library's sources as a TFDS
      ArrayRecord dataset, prepared once into ``data.cache_dir``); ``split`` is ``train`` or
      ``validation``.
    - ``tfds``: a TFDS dataset already prepared in ArrayRecord format (``tfds build
      --file_format=array_record``): ``name`` (``"my_corpus"`` or ``"my_corpus:1.0.0"``),
      ``split`` (any TFDS split spec, e.g. ``"train[:90%]"``), ``data_dir`` (``""``: TFDS's
      default), ``text_key`` (the text feature).
    - ``files``: local files matching the glob patterns in ``paths`` (``~`` and ``**`` work).
      ``format`` ``auto`` picks by name: ``.txt .text .md`` txt, ``.jsonl .ndjson .json``
      jsonl (one JSON object a line, text in ``text_key``), ``.parquet`` parquet (text in the
      ``text_key`` column), ``.array_record``/``.arrayrecord``/``*.array_record-NNNNN-of-NNNNN``
      ArrayRecord (each record one UTF-8 document). A txt file is one document
      (``txt_document: file``) or one document per blank-line-separated paragraph
      (``txt_document: paragraph``).

    ``weight``: the source's share of the documents drawn in a mixture (relative; weights are
    normalised). ``label``: its name in metrics (``""``: derived from kind/name/paths).
    """

    kind: DataSourceKind = "builtin"
    weight: float = 1.0
    label: str = ""
    split: str = "train"
    name: str = ""
    data_dir: str = ""
    text_key: str = "text"
    paths: tuple[str, ...] = ()
    format: FileFormat = "auto"
    txt_document: Literal["file", "paragraph"] = "file"

    def display_name(self) -> str:
        if self.label:
            return self.label
        if self.kind == "builtin":
            return f"builtin:{self.split}"
        if self.kind == "tfds":
            return f"tfds:{self.name}:{self.split}"
        return "files:" + ",".join(self.paths)


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Training data: sources, packing, shuffling and the input pipeline (see ``mcpm.data``).

    Documents are tokenized with SentencePiece (bos first, eos last), packed into rows of
    ``seq_len`` tokens and batched ``batch_size`` rows at a time (the global batch; each of P
    processes gets ``batch_size / P`` rows from its own disjoint share of every source). A
    document longer than ``max_doc_tokens`` (0: ``seq_len``; at most ``seq_len``) is split into
    pieces of that many tokens rather than dropped; each piece is its own packed segment and
    consecutive pieces overlap by one token, so every next-token target is still trained once.

    ``tokenizer``: a SentencePiece model (a file or a folder holding ``tokenizer.model``);
    ``""`` uses the built-in one, trained once on the built-in corpus (``builtin_vocab_size``
    pieces) into ``cache_dir``. ``cache_dir``: ``""`` is ``$MCPM_CACHE`` or ``~/.cache/mcpm``.
    ``builtin_limit`` > 0 builds the built-in corpus from the first N stdlib files only (tests).

    Pipeline: ``read_threads`` threads read and tokenize documents; ``workers`` > 0 runs the
    reading, tokenizing and packing in that many processes (grain ``mp_prefetch``; the batch
    order depends on the number of workers, so resume with the same number); ``prefetch``
    batches are prepared ahead (per worker with workers, else in a background thread).
    The same ``seed`` gives the same batches; every epoch is reshuffled.

    ``shuffle_window``: after the documents are shuffled and split into pieces (of at most
    ``max_doc_tokens``), the pieces are shuffled within windows of this many pieces before
    packing, so that a long document is spread over many batches and each batch mixes many
    documents (memory: about ``shuffle_window x max_doc_tokens`` tokens per process; a resume
    re-reads at most one window). 0: the pieces are packed in order (a long document fills
    consecutive batches). ``shuffle: false`` (evaluation) shuffles neither documents nor pieces.

    ``eval_sources``: the held-out text that ``eval_loss`` is measured on (never trained on);
    empty: the built-in corpus' ``validation`` split when every training source is the built-in
    ``train`` split, else no evaluation (give your own held-out files here).
    """

    sources: tuple[DataSourceConfig, ...] = (DataSourceConfig(),)
    eval_sources: tuple[DataSourceConfig, ...] = ()
    seq_len: int = 512
    batch_size: int = 16
    seed: int = 0
    shuffle: bool = True
    shuffle_window: int = 4096
    tokenizer: str = ""
    builtin_vocab_size: int = 4096
    builtin_limit: int = 0
    cache_dir: str = ""
    max_doc_tokens: int = 0
    read_threads: int = 2
    prefetch: int = 2
    workers: int = 0

    def __post_init__(self):
        if not self.sources:
            raise ConfigError("data.sources is empty; add at least one source, e.g. "
                              "{kind: builtin}")
        if self.seq_len < 2:
            raise ConfigError(f"data.seq_len must be >= 2, got {self.seq_len}")
        if self.batch_size < 1:
            raise ConfigError(f"data.batch_size must be >= 1, got {self.batch_size}")
        if self.max_doc_tokens and not 2 <= self.max_doc_tokens <= self.seq_len:
            raise ConfigError(f"data.max_doc_tokens must be 0 (= seq_len) or in [2, seq_len="
                              f"{self.seq_len}], got {self.max_doc_tokens}")
        for name in ("shuffle_window", "read_threads", "prefetch", "workers"):
            if getattr(self, name) < 0:
                raise ConfigError(f"data.{name} must be >= 0, got {getattr(self, name)}")
        if self.builtin_limit < 0 or self.builtin_limit == 1:
            raise ConfigError(f"data.builtin_limit must be 0 (all files) or >= 2 (a train and a "
                              f"validation file), got {self.builtin_limit}")
        if self.builtin_vocab_size < 259:
            raise ConfigError(f"data.builtin_vocab_size must be >= 259 (3 special ids and 256 "
                              f"byte pieces), got {self.builtin_vocab_size}")
        _check_sources(self.sources, "data.sources")
        _check_sources(self.eval_sources, "data.eval_sources")
        trained = {(s.kind, s.name, s.split, s.data_dir, s.paths) for s in self.sources}
        for i, src in enumerate(self.eval_sources):
            if (src.kind, src.name, src.split, src.data_dir, src.paths) in trained:
                raise ConfigError(f"data.eval_sources[{i}] ({src.display_name()}) is also a "
                                  "training source: held-out loss needs text the model never "
                                  "trains on (e.g. the built-in split 'validation')")

    def eval_source_list(self) -> tuple[DataSourceConfig, ...]:
        """The held-out sources ``eval_loss`` is measured on (see the class docstring)."""
        if self.eval_sources:
            return self.eval_sources
        if all(s.kind == "builtin" and s.split == "train" for s in self.sources):
            return (DataSourceConfig(kind="builtin", split="validation"),)
        return ()

    @property
    def piece_len(self) -> int:
        """The longest packed segment: ``max_doc_tokens``, or ``seq_len`` when 0."""
        return self.max_doc_tokens or self.seq_len


def _check_sources(sources, key: str) -> None:
    labels = set()
    for i, src in enumerate(sources):
        where = f"{key}[{i}]"
        if not (src.weight > 0 and math.isfinite(src.weight)):
            raise ConfigError(f"{where}.weight must be a positive number, got {src.weight}")
        if src.kind == "builtin" and src.split not in ("train", "validation"):
            raise ConfigError(f"{where}.split: the built-in corpus has the splits 'train' and "
                              f"'validation', got {src.split!r}"
                              + _suggest(src.split, ["train", "validation"]))
        if src.kind == "tfds" and not src.name:
            raise ConfigError(f"{where}.name: a tfds source needs the dataset's name "
                              "(e.g. name: my_corpus or my_corpus:1.0.0)")
        if src.kind == "files" and not src.paths:
            raise ConfigError(f"{where}.paths: a files source needs glob patterns "
                              "(e.g. paths: ['data/*.jsonl'])")
        if src.kind == "files" and any(not p.strip() for p in src.paths):
            raise ConfigError(f"{where}.paths holds an empty pattern")
        used = {"builtin": {"split"}, "tfds": {"name", "split", "data_dir", "text_key"},
                "files": {"paths", "format", "txt_document", "text_key"}}[src.kind]
        for f in ("split", "name", "data_dir", "text_key", "paths", "format", "txt_document"):
            if f not in used and getattr(src, f) != getattr(DataSourceConfig, f):
                raise ConfigError(f"{where}.{f} is not used by kind {src.kind!r} (it belongs "
                                  f"to kind {_kinds_using(f)})")
        if not src.text_key:
            raise ConfigError(f"{where}.text_key must not be empty")
        name = src.display_name()
        if name in labels:
            raise ConfigError(f"{where}: two sources are both called {name!r}; give one a "
                              "different label")
        labels.add(name)


def _kinds_using(field: str) -> str:
    kinds = {"split": ["builtin", "tfds"], "name": ["tfds"], "data_dir": ["tfds"],
             "text_key": ["tfds", "files"], "paths": ["files"], "format": ["files"],
             "txt_document": ["files"]}[field]
    return " or ".join(repr(k) for k in kinds)


MESH_AXES = ("data", "fsdp", "tensor")


@dataclasses.dataclass(frozen=True)
class ShardingRules:
    """Which mesh axes each logical axis of the model is split over (empty = replicated).

    Defaults: batch over data and fsdp; FSDP over ``embed``; tensor parallelism over heads, the
    MLP and the vocabulary. A dimension the mesh axes do not divide stays replicated.
    """

    batch: tuple[str, ...] = ("data", "fsdp")
    embed: tuple[str, ...] = ("fsdp",)
    vocab: tuple[str, ...] = ("tensor",)
    heads: tuple[str, ...] = ("tensor",)
    kv_heads: tuple[str, ...] = ("tensor",)
    head_dim: tuple[str, ...] = ()
    mlp: tuple[str, ...] = ("tensor",)
    layers: tuple[str, ...] = ()
    length: tuple[str, ...] = ()

    def __post_init__(self):
        for f in dataclasses.fields(self):
            axes = getattr(self, f.name)
            for axis in axes:
                if axis not in MESH_AXES:
                    raise ConfigError(f"mesh.rules.{f.name}: {axis!r} is not a mesh axis "
                                      f"{list(MESH_AXES)}" + _suggest(axis, MESH_AXES))
            if len(set(axes)) != len(axes):
                raise ConfigError(f"mesh.rules.{f.name} names a mesh axis twice: {list(axes)}")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device mesh ``data x fsdp x tensor``; one size may be -1 (the devices left over)."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1
    rules: ShardingRules = ShardingRules()

    def __post_init__(self):
        sizes = [self.data, self.fsdp, self.tensor]
        if any(s == 0 or s < -1 for s in sizes):
            raise ConfigError(f"mesh sizes must be positive or -1, got data={self.data}, "
                              f"fsdp={self.fsdp}, tensor={self.tensor}")
        if sizes.count(-1) > 1:
            raise ConfigError("only one of mesh.data, mesh.fsdp, mesh.tensor may be -1")

    def shape(self, num_devices: int) -> tuple[int, int, int]:
        """(data, fsdp, tensor) for ``num_devices`` devices, -1 filled in."""
        sizes = [self.data, self.fsdp, self.tensor]
        known = math.prod(s for s in sizes if s != -1)
        if -1 in sizes:
            if num_devices % known:
                raise ConfigError(f"mesh: {num_devices} devices cannot be split into data="
                                  f"{self.data} x fsdp={self.fsdp} x tensor={self.tensor}")
            sizes[sizes.index(-1)] = num_devices // known
        if math.prod(sizes) != num_devices:
            raise ConfigError(f"mesh: data={sizes[0]} x fsdp={sizes[1]} x tensor={sizes[2]} = "
                              f"{math.prod(sizes)} devices, but {num_devices} are available; "
                              "set one size to -1 to fill the rest")
        return tuple(sizes)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """``mcpm train``: the run's directory and length, loss options, logging and checkpoints.

    ``steps`` is the total number of optimizer steps of the run: running again on the same
    workdir with the same or a larger ``steps`` resumes from the latest checkpoint. A branch
    decay (``decay_from`` >= 0) restores the checkpoint at that step of ``workdir`` and decays
    for ``decay_steps`` steps into ``workdir/decay_from_STEP``, leaving the main run untouched.

    ``loss_chunk`` > 0 computes the loss ``loss_chunk`` positions at a time, recomputing each
    piece's logits in the backward pass: the float32 ``[B, T, V]`` logits (4.8 GB at 8 x 2048
    tokens and MiniCPM4's 73K vocabulary) are never held at once. 0: the whole sequence.

    ``eval_every`` > 0 measures the held-out loss (``eval_loss``, on ``data.eval_sources``)
    every that many steps; it is also measured at the end of every run and branch decay (0:
    only there). ``eval_batches`` global batches are evaluated each time, the same ones every
    time (the held-out sources read in order, unshuffled).

    ``init_from``: an mcpm checkpoint or an official Hugging Face directory whose weights
    start a fresh run (its optimizer state and schedule start afresh, warm-up included); the
    model config must describe the same architecture. Resumes continue from the run's own
    checkpoints and ignore it.
    """

    workdir: str = "runs/train"
    steps: int = 1000
    z_loss: float = 0.0
    accum_steps: int = 1
    loss_chunk: int = 0
    log_every: int = 10
    checkpoint_every: int = 200
    keep_last: int = 3
    keep_every: int = 0
    max_nonfinite_in_a_row: int = 5
    peak_flops_per_device: float = 0.0
    decay_from: int = -1
    decay_steps: int = 0
    eval_every: int = 0
    eval_batches: int = 8
    init_from: str = ""
    schedule: ScheduleConfig = ScheduleConfig()
    optimizer: OptimizerConfig = OptimizerConfig()

    def __post_init__(self):
        for name in ("steps", "accum_steps", "log_every", "checkpoint_every", "keep_last",
                     "max_nonfinite_in_a_row"):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        if self.eval_every < 0:
            raise ConfigError(f"train.eval_every must be >= 0 (0: evaluate at the end only), got "
                              f"{self.eval_every}")
        if self.eval_batches < 0:
            raise ConfigError(f"train.eval_batches must be >= 0 (0: no evaluation), got "
                              f"{self.eval_batches}")
        if self.keep_every < 0:
            raise ConfigError(f"train.keep_every must be >= 0 (0: keep only the last "
                              f"train.keep_last), got {self.keep_every}")
        if self.z_loss < 0:
            raise ConfigError(f"train.z_loss must be >= 0, got {self.z_loss}")
        if self.loss_chunk < 0:
            raise ConfigError(f"train.loss_chunk must be >= 0 (0: the whole sequence at once), "
                              f"got {self.loss_chunk}")
        if self.decay_from >= 0 and self.decay_steps < 1:
            raise ConfigError(f"train.decay_from={self.decay_from} needs train.decay_steps >= 1 "
                              "(the length of the branch decay)")


SEARCHABLE = ("peak_lr", "init_std", "scale_emb", "scale_depth", "batch_size")


@dataclasses.dataclass(frozen=True)
class SearchConfig:
    """``mcpm tunnel search``: an optuna study over a muP proxy (training spec section 2).

    Each trial trains the config's model for ``steps`` constant-lr steps (after the warm-up),
    branches a decay of ``decay_steps`` from the last one, and scores the decayed model by
    ``objective``: ``eval_loss`` (held-out loss) or ``indicator`` (the loss on reasoning and
    answer given the question, on ``indicator_data``; ``""``: the set mcpm ships).

    ``params`` names the searched settings (:data:`SEARCHABLE`); the ranges are the paper's
    (``peak_lr`` is searched on a log scale, the others linearly). ``batch_size`` is searched
    over ``batch_sizes`` when named. ``sampler``: ``tpe`` (optuna's TPE, ``trials`` trials) or
    ``grid`` (``grid_points`` values of each range, every combination once).

    ``storage``: an optuna RDB URL; ``""`` is ``sqlite:///WORKDIR/search.db``. Several hosts share
    one search through a server database, e.g.
    ``postgresql+psycopg2://user:password@host:5432/mcpm``. ``parallel`` local worker processes
    run trials at once (each on ``jax.local_device_count() / parallel`` devices when more than
    one is present).
    """

    workdir: str = "runs/search"
    study: str = "mcpm"
    storage: str = ""
    trials: int = 16
    sampler: Literal["tpe", "grid"] = "tpe"
    grid_points: int = 3
    objective: Literal["eval_loss", "indicator"] = "eval_loss"
    indicator_data: str = ""
    params: tuple[str, ...] = ("peak_lr", "init_std", "scale_emb", "scale_depth")
    peak_lr: tuple[float, ...] = (1e-3, 1e-1)
    init_std: tuple[float, ...] = (0.025, 0.2)
    scale_emb: tuple[float, ...] = (2.5, 20.0)
    scale_depth: tuple[float, ...] = (1.0, 8.0)
    batch_sizes: tuple[int, ...] = (8, 16, 32)
    steps: int = 100
    decay_steps: int = 10
    parallel: int = 1
    seed: int = 0

    def __post_init__(self):
        for name in self.params:
            if name not in SEARCHABLE:
                raise ConfigError(f"tunnel.search.params: {name!r} is not searchable "
                                  f"{list(SEARCHABLE)}" + _suggest(name, SEARCHABLE))
        for name in ("peak_lr", "init_std", "scale_emb", "scale_depth"):
            lo_hi = getattr(self, name)
            if len(lo_hi) != 2 or not 0 < lo_hi[0] < lo_hi[1]:
                raise ConfigError(f"tunnel.search.{name} must be [low, high] with 0 < low < "
                                  f"high, got {list(lo_hi)}")
        if not self.batch_sizes or any(b < 1 for b in self.batch_sizes):
            raise ConfigError(f"tunnel.search.batch_sizes must be positive integers, got "
                              f"{list(self.batch_sizes)}")
        for name in ("trials", "grid_points", "steps", "decay_steps", "parallel"):
            if getattr(self, name) < 1:
                raise ConfigError(f"tunnel.search.{name} must be >= 1, got {getattr(self, name)}")


@dataclasses.dataclass(frozen=True)
class TransferConfig:
    """``mcpm tunnel transfer``: the lr sweep at several widths, with muP and with standard
    parametrisation (SP: no width multipliers; the same fan-in initialisation). Each point is a
    WSD run of ``steps`` steps (the config's schedule shape) scored by held-out loss."""

    workdir: str = "runs/transfer"
    widths: tuple[int, ...] = (64, 128, 256)
    lrs: tuple[float, ...] = (0.0025, 0.005, 0.01, 0.02, 0.04, 0.08)
    parametrizations: tuple[Literal["mup", "sp"], ...] = ("mup", "sp")
    steps: int = 200

    def __post_init__(self):
        if len(self.widths) < 1 or any(w < 1 for w in self.widths):
            raise ConfigError(f"tunnel.transfer.widths must be positive, got {list(self.widths)}")
        if len(self.lrs) < 2 or any(not lr > 0 for lr in self.lrs):
            raise ConfigError(f"tunnel.transfer.lrs needs two or more positive values, got "
                              f"{list(self.lrs)}")
        if self.steps < 1:
            raise ConfigError(f"tunnel.transfer.steps must be >= 1, got {self.steps}")


@dataclasses.dataclass(frozen=True)
class ScaleConfig:
    """``mcpm tunnel scale``: one constant-lr run per width and branch decays (training spec
    section 1) at the step counts ``decays``, each decaying for ``decay_ratio`` of its fork
    step (at least one step). Collects (N, D, loss) into ``WORKDIR/scaling.jsonl``."""

    workdir: str = "runs/scale"
    widths: tuple[int, ...] = (64, 96, 128, 192)
    decays: tuple[int, ...] = (100, 200, 400)
    decay_ratio: float = 0.1

    def __post_init__(self):
        if not self.widths or any(w < 1 for w in self.widths):
            raise ConfigError(f"tunnel.scale.widths must be positive, got {list(self.widths)}")
        if not self.decays or any(d < 1 for d in self.decays):
            raise ConfigError(f"tunnel.scale.decays must be positive step counts, got "
                              f"{list(self.decays)}")
        if not 0 < self.decay_ratio <= 1:
            raise ConfigError(f"tunnel.scale.decay_ratio must be in (0, 1], got "
                              f"{self.decay_ratio}")


@dataclasses.dataclass(frozen=True)
class TunnelConfig:
    """ModelTunnel v2 (``mcpm tunnel ...``); none of it changes what ``mcpm train`` does."""

    search: SearchConfig = SearchConfig()
    transfer: TransferConfig = TransferConfig()
    scale: ScaleConfig = ScaleConfig()


QuantMethod = Literal["none", "ternary"]


@dataclasses.dataclass(frozen=True)
class QuantConfig:
    """Quantization-aware training (``mcpm train``): which weights the forward pass quantizes.

    ``method: ternary`` (BitCPM4) replaces the hidden matrices q, k, v, o, gate, up and down
    by absmean ternary weights ``clip(round(W / s), -1, 1) * s`` in every forward pass, with a
    straight-through gradient to the float weights W that the optimizer keeps
    (:mod:`mcpm.quant.qat`). ``group_size`` 0: one scale ``s = mean|W|`` per matrix (per
    layer); g > 0: one per g consecutive input rows and output column. ``embeddings`` and
    ``head`` quantize the embedding table and the untied lm_head too (both stay float by
    default, as in BitCPM4).

    ``distill_weight`` > 0 adds ``weight * KL(teacher || student)`` per target token to the
    loss, the teacher being the float model of ``train.init_from`` (temperature
    ``distill_temperature``); it needs ``train.init_from`` and the whole-sequence loss
    (``train.loss_chunk`` 0).
    """

    method: QuantMethod = "none"
    group_size: int = 0
    embeddings: bool = False
    head: bool = False
    distill_weight: float = 0.0
    distill_temperature: float = 1.0

    def __post_init__(self):
        choices = typing.get_args(QuantMethod)
        if self.method not in choices:
            raise ConfigError(f"quant.method: {self.method!r} is not one of {list(choices)}"
                              + _suggest(str(self.method), choices))
        if self.group_size < 0:
            raise ConfigError(f"quant.group_size must be >= 0 (0: one scale per matrix), got "
                              f"{self.group_size}")
        if self.distill_weight < 0:
            raise ConfigError(f"quant.distill_weight must be >= 0, got {self.distill_weight}")
        if not self.distill_temperature > 0:
            raise ConfigError(f"quant.distill_temperature must be positive, got "
                              f"{self.distill_temperature}")
        if self.method == "none" and (self.distill_weight or self.embeddings or self.head
                                      or self.group_size):
            raise ConfigError("quant.group_size / embeddings / head / distill_weight need "
                              "quant.method=ternary")

    @property
    def enabled(self) -> bool:
        return self.method != "none"


@dataclasses.dataclass(frozen=True)
class Config:
    """The root of a YAML file in ``configs/``."""

    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    generate: GenerateConfig = dataclasses.field(default_factory=GenerateConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    tunnel: TunnelConfig = dataclasses.field(default_factory=TunnelConfig)
    quant: QuantConfig = dataclasses.field(default_factory=QuantConfig)
    seed: int = 0

    def __post_init__(self):
        q, t = self.quant, self.train
        if q.distill_weight and not t.init_from:
            raise ConfigError("quant.distill_weight > 0 distils from the float model of "
                              "train.init_from: set train.init_from=CHECKPOINT")
        if q.distill_weight and t.loss_chunk:
            raise ConfigError("quant.distill_weight > 0 needs the whole-sequence logits: set "
                              "train.loss_chunk=0")
        problem = group_size_problem(q, self.model)
        if problem:
            raise ConfigError(f"quant.group_size={q.group_size} {problem}")


def group_size_problem(q: QuantConfig, model: ModelConfig) -> Optional[str]:
    """Why ``q.group_size`` does not fit ``model`` (None when it does): every quantized
    matrix's input dimension must be a multiple of it."""
    g = q.group_size
    if not g:
        return None
    inputs = {"hidden_size (q, k, v, gate, up)": model.hidden_size,
              "num_attention_heads * head_dim (o)": model.num_attention_heads * model.head_dim,
              "intermediate_size (down)": model.intermediate_size}
    if q.embeddings or q.head:
        inputs["hidden_size (embeddings / head)"] = model.hidden_size
    bad = [f"{name} = {n}" for name, n in inputs.items() if n % g]
    if not bad:
        return None
    common = math.gcd(*inputs.values())
    return (f"does not divide the input dimension of {', '.join(bad)}: use a divisor of "
            f"{common} (or 0 for one scale per matrix)")


# --------------------------------------------------------------------------------------------
# dict <-> dataclass, with checking
# --------------------------------------------------------------------------------------------

def _suggest(key: str, valid: Sequence[str]) -> str:
    close = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.5)
    return f"; did you mean '{close[0]}'?" if close else f"; valid keys: {', '.join(sorted(valid))}"


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value: Any, tp: Any, path: str) -> Any:
    """Check ``value`` against the annotation ``tp`` and convert it (lists -> tuples, etc.)."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, path)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{path}: {value!r} fits none of "
                          f"{_type_name(tp)}")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{path}: {value!r} is not one of {list(choices)}"
                              + (_suggest(str(value), [str(c) for c in choices])
                                 if isinstance(value, str) else ""))
        return value
    if origin is tuple:
        args = typing.get_args(tp)
        if isinstance(value, (int, float, str)) and not isinstance(value, bool) and args[-1] is Ellipsis:
            value = [value]  # a single value where a list is expected (HF's eos_token_id: 2)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        item = args[0]
        return tuple(_convert(v, item, f"{path}[{i}]") for i, v in enumerate(value))
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping of {tp.__name__} fields, got {value!r}")
        return from_dict(tp, value, path)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 3e-4 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {value!r}")
        return value
    if tp is Any:
        return value
    raise TypeError(f"unsupported config annotation {tp} at {path}")


def from_dict(cls, data: dict, path: str = ""):
    """Build dataclass ``cls`` from a nested dict, failing on unknown keys and wrong types."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        full = f"{path}.{key}" if path else str(key)
        if key not in fields:
            raise ConfigError(f"unknown config key '{full}'" + _suggest(str(key), list(fields)))
        kwargs[key] = _convert(value, hints[key], full)
    required = [name for name, f in fields.items() if name not in kwargs
                and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if required:
        where = f"'{path}'" if path else cls.__name__
        raise ConfigError(f"{where} needs the key(s) {required}")
    try:
        return cls(**kwargs)
    except ConfigError as e:
        # validation messages name keys relative to their section ("sparse_config.topk ...");
        # give them the full path when the section is nested ("model.sparse_config.topk ...")
        parent, _, leaf = path.rpartition(".")
        msg = str(e)
        if parent and msg.startswith(f"{leaf}."):
            raise ConfigError(f"{parent}.{msg}") from None
        raise


def to_dict(cfg) -> dict:
    """A plain nested dict (tuples as lists) that :func:`from_dict` turns back into ``cfg``."""
    def plain(v):
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (tuple, list)):
            return [plain(x) for x in v]
        return v
    return plain(cfg)


# --------------------------------------------------------------------------------------------
# YAML files and key=value overrides
# --------------------------------------------------------------------------------------------

class _UniqueKeyLoader(yaml.SafeLoader):
    """A SafeLoader that refuses a key given twice in one mapping (plain YAML keeps the last
    one silently), naming the key's dotted path and both lines."""

    def __init__(self, stream):
        super().__init__(stream)
        self._paths: dict[int, str] = {}  # id(node) -> dotted path of the value it holds

    def _child(self, node, part: str) -> str:
        parent = self._paths.get(id(node), "")
        return f"{parent}{part}" if part.startswith("[") or not parent else f"{parent}.{part}"

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, int] = {}
            for key_node, value_node in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue  # "<<: *defaults" merges are meant to be overridden
                key = self.construct_object(key_node, deep=True)
                line = key_node.start_mark.line + 1
                full = self._child(node, str(key))
                try:
                    first = seen.get(key)
                except TypeError:  # an unhashable key: the constructor reports it
                    continue
                if first is not None:
                    lines = f" (lines {first} and {line})" if first != line else ""
                    raise ConfigError(f"the key '{full}' is given twice{lines}; the later one "
                                      "would silently win: keep one of them")
                seen[key] = line
                self._paths[id(value_node)] = full
        return super().construct_mapping(node, deep=deep)

    def construct_sequence(self, node, deep=False):
        if isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                self._paths[id(item)] = self._child(node, f"[{i}]")
        return super().construct_sequence(node, deep=deep)


def _yaml_load(text: str, prefix: str = ""):
    """``yaml.safe_load`` that refuses duplicate keys; ``prefix`` is the dotted path of the
    document (an override's key), so that errors name full paths."""
    loader = _UniqueKeyLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        if prefix:
            loader._paths[id(node)] = prefix
        return loader.construct_document(node)
    finally:
        loader.dispose()


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"model.hidden_size=256"`` -> (["model", "hidden_size"], 256); values are parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' is not of the form key=value (e.g. model.hidden_size=256)")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override '{text}' has an empty key")
    try:
        value = _yaml_load(raw, key) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override '{text}': cannot parse the value: {e}") from None
    except ConfigError as e:
        raise ConfigError(f"override '{text}': {e}") from None
    return key.split("."), value


def apply_overrides(data: dict, overrides: Sequence[str], cls=Config) -> dict:
    """Set each dotted ``key=value`` in a nested dict, checking each path against ``cls``.

    Errors name the override they come from."""
    data = copy.deepcopy(data)
    for text in overrides:
        keys, value = parse_override(text)
        node, node_cls = data, cls
        for depth, key in enumerate(keys):
            full = ".".join(keys[:depth + 1])
            names = [f.name for f in dataclasses.fields(node_cls)] if node_cls else None
            if names is not None and key not in names:
                raise ConfigError(f"override {text}: unknown config key '{full}'"
                                  + _suggest(key, names))
            if depth == len(keys) - 1:
                node[key] = value
                break
            hint = typing.get_type_hints(node_cls)[key]
            sub_cls = next((a for a in (typing.get_args(hint) or (hint,))
                            if dataclasses.is_dataclass(a)), None)
            if sub_cls is None:
                raise ConfigError(f"override {text}: '{full}' is a value, not a section: cannot "
                                  f"set '{text.split('=')[0]}'")
            if not isinstance(node.get(key), dict):
                node[key] = {}
            node, node_cls = node[key], sub_cls
    return data


def load_yaml(path: str | Path) -> dict:
    """A YAML config file as a dict; a missing, unreadable or malformed file, a top level that
    is not a mapping and a key given twice are :class:`ConfigError` naming the file."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config file {path} does not exist")
    if path.is_dir():
        raise ConfigError(f"config file {path} is a directory; give a YAML file such as "
                          "configs/tiny.yaml")
    try:
        data = _yaml_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not a text file (invalid UTF-8 at byte {e.start})") from None
    except OSError as e:
        raise ConfigError(f"config file {path} cannot be read ({e.strerror or e})") from None
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping, got {type(data).__name__}")
    return data


def load_config(path: str | Path | None = None, overrides: Sequence[str] = (), cls=Config):
    """Load a YAML config (or the defaults), apply ``key=value`` overrides, validate.

    An error names its cause: the file (when the file alone has it) or the first override
    after which it appears (``override model.hidden_size=abc: model.hidden_size: ...``).
    """
    base = load_yaml(path) if path is not None else {}
    data = apply_overrides(base, overrides, cls)
    try:
        return from_dict(cls, data)
    except ConfigError as e:
        error = str(e)
    # Validate the file alone, then with one more override at a time, until the error appears:
    # overrides are checked together (one may fix what an earlier one breaks), but the message
    # names where the problem comes from.
    for k in range(len(overrides) + 1):
        try:
            from_dict(cls, apply_overrides(base, overrides[:k], cls))
        except ConfigError as e:
            if str(e) == error:
                break
    if k == 0:
        raise ConfigError(f"{path}: {error}" if path is not None else error) from None
    raise ConfigError(f"override {overrides[k - 1]}: {error}") from None


def save_yaml(cfg, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


# --------------------------------------------------------------------------------------------
# Official HF config.json <-> ModelConfig
# --------------------------------------------------------------------------------------------

# Keys of config.json that ModelConfig owns. Everything else (architectures, torch_dtype,
# transformers_version, ...) is passed through unchanged when a template is given.
_HF_MODEL_KEYS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "max_position_embeddings", "rope_theta", "rope_scaling",
    "rms_norm_eps", "scale_emb", "scale_depth", "dim_model_base", "initializer_range",
    "tie_word_embeddings", "bos_token_id", "eos_token_id", "sparse_config")

# What the official MiniCPMConfig assumes when a key is absent (num_key_value_heads defaults to
# num_attention_heads). These, not mcpm's MiniCPM4 defaults, apply to a config.json.
_HF_DEFAULTS = {"max_position_embeddings": 2048, "rope_theta": 10000.0, "rope_scaling": None,
                "rms_norm_eps": 1e-6, "scale_emb": 1, "scale_depth": 1, "dim_model_base": 1,
                "initializer_range": 0.02, "tie_word_embeddings": True, "bos_token_id": 1,
                "eos_token_id": 2, "sparse_config": None}

_HF_FIXED = {"hidden_act": "silu", "attention_bias": False, "pretraining_tp": 1}


def _sparse_to_hf(sparse: SparseConfig) -> dict:
    """The official keys, plus mcpm's own ones only where they differ from the default."""
    out = to_dict(sparse)
    for name in _SPARSE_MCPM_ONLY:
        if out[name] == getattr(SparseConfig, name):
            del out[name]
    return out


_SPARSE_MCPM_ONLY = ("variant", "lse_approx")


def model_config_from_hf(hf: dict, source: str = "config.json", **run_options) -> ModelConfig:
    """Read an official MiniCPM ``config.json`` dict. ``run_options`` set mcpm-only fields."""
    if hf.get("model_type", "minicpm") != "minicpm":
        raise ConfigError(f"{source}: model_type is {hf.get('model_type')!r}, expected 'minicpm'")
    for key, expected in _HF_FIXED.items():
        if key in hf and hf[key] != expected:
            raise ConfigError(f"{source}: {key} = {hf[key]!r} is not supported (MiniCPM4 uses "
                              f"{expected!r})")
    missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                           "num_attention_heads") if k not in hf]
    if missing:
        raise ConfigError(f"{source}: missing required keys {missing}")
    if "dim_model_base" not in hf:
        warnings.warn(f"{source} has no dim_model_base; using 1 as the official code does "
                      "(logits divided by hidden_size). Add \"dim_model_base\": 256 if this is a "
                      "MiniCPM4 release config.", stacklevel=2)
    data = {key: hf.get(key, _HF_DEFAULTS.get(key)) for key in _HF_MODEL_KEYS
            if key in hf or key in _HF_DEFAULTS}
    data.setdefault("num_key_value_heads", hf["num_attention_heads"])
    rope = data.get("rope_scaling")
    if rope is not None:
        rope = dict(rope)
        kind = rope.pop("rope_type", rope.pop("type", None))
        if kind != "longrope":
            raise ConfigError(f"{source}: rope_scaling type {kind!r} is not supported "
                              "(MiniCPM4 uses 'longrope')")
        rope.pop("factor", None)
        data["rope_scaling"] = rope
    data.update(run_options)
    try:
        return from_dict(ModelConfig, data, "")
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None


def _num(x: float):
    """Write integral floats as ints the way the official configs do (scale_emb: 12)."""
    return int(x) if isinstance(x, float) and x.is_integer() else x


def model_config_to_hf(cfg: ModelConfig, template: dict | None = None) -> dict:
    """An official-format ``config.json`` dict for ``cfg``.

    With ``template`` (the config.json a checkpoint came with) every key mcpm does not own is kept
    as it was, and keys the template left out stay out while their value is the official default,
    so ``model_config_to_hf(model_config_from_hf(d), d) == d``.
    """
    out = dict(template) if template is not None else {
        "architectures": ["MiniCPMForCausalLM"],
        "model_type": "minicpm",
        "hidden_act": "silu",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "pretraining_tp": 1,
        "use_cache": True,
        "torch_dtype": cfg.param_dtype,
    }
    values = {
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads,
        "max_position_embeddings": cfg.max_position_embeddings,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": None if cfg.rope_scaling is None else {
            "rope_type": "longrope",
            "long_factor": list(cfg.rope_scaling.long_factor),
            "short_factor": list(cfg.rope_scaling.short_factor),
            "original_max_position_embeddings": cfg.rope_scaling.original_max_position_embeddings,
        },
        "rms_norm_eps": cfg.rms_norm_eps,
        "scale_emb": _num(cfg.scale_emb),
        "scale_depth": _num(cfg.scale_depth),
        "dim_model_base": _num(cfg.dim_model_base),
        "initializer_range": cfg.initializer_range,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": (cfg.eos_token_id[0] if len(cfg.eos_token_id) == 1 else
                         list(cfg.eos_token_id)),
        "sparse_config": None if cfg.sparse_config is None else _sparse_to_hf(cfg.sparse_config),
    }
    if template is not None:
        if isinstance(template.get("eos_token_id"), list):
            values["eos_token_id"] = list(cfg.eos_token_id)
        old_rope = template.get("rope_scaling")
        if old_rope is not None and values["rope_scaling"] is not None:
            # keep the template's key order and its spelling of the type key
            merged = dict(old_rope)
            merged.update({k: v for k, v in values["rope_scaling"].items() if k != "rope_type"})
            if "type" in old_rope and "rope_type" not in old_rope:
                merged["type"] = "longrope"
            else:
                merged["rope_type"] = "longrope"
            values["rope_scaling"] = merged
        defaults = dict(_HF_DEFAULTS, num_key_value_heads=cfg.num_attention_heads)
        for key, val in values.items():
            if key not in template and key in defaults and val == defaults[key]:
                continue
            if key in template and _same_number(template[key], val):
                continue  # keep 12 vs 12.0 as the template wrote it
            out[key] = val
    else:
        out.update(values)
    return out


def _same_number(a, b) -> bool:
    return (isinstance(a, (int, float)) and isinstance(b, (int, float))
            and not isinstance(a, bool) and not isinstance(b, bool) and a == b)
