"""The attention seam: every attention call in the model goes through :func:`attention` (or
:func:`cached_attention`, the same over one layer of the head-major KV cache).

Dense grouped-query attention, or InfLLM v2 (spec section 3, from ``mcpm_kernels``) when a
``sparse_config`` is set and the key length reaches ``dense_len``: over the new keys in a
cache-less call, over the KV cache and its compressed keys in a cached one (prefill, decode).
InfLLM v2's blocks and kernels count from each row's first real token, so left padding does not
change a row's outputs.

Implementations (``ModelConfig.attention_impl`` / ``sparse_attention_impl``, resolved per call
at trace time for the platform the program is traced for, see :func:`target_platform`):

* dense, cache-less: ``einsum`` (the whole ``[B, K, G, T, S]`` score array; short sequences),
  ``flash`` (tiled online softmax in plain JAX, memory linear in T, any backend), ``cudnn``
  (NVIDIA GPUs; one causal sequence per row, bfloat16/float16), ``splash`` (Pallas, TPU).
  ``auto``: CPU einsum up to :data:`EINSUM_MAX_KEYS` keys, flash beyond; GPU cudnn where it
  applies (no segment ids, a dtype and head dim it takes), else flash; TPU splash.
* dense over a KV cache: einsum for decode and prefills of up to :data:`PREFILL_EINSUM_MAX_QUERIES`
  queries (and always with ``einsum``), else the flash forward with a query offset.
* InfLLM v2, cache-less: ``xla`` (gathered plain JAX) or ``pallas`` (TPU kernels; interpreted on
  CPU, refused on GPU); ``auto`` is pallas on TPU, xla elsewhere. Over a KV cache: plain JAX.

Every implementation gives the same function: causal, within a segment, never a padding key
(segment 0), zeros for rows that see no key; query head n uses kv head n // G, and no
implementation repeats K/V heads.

Mask convention (everywhere in mcpm): boolean, True = attend.
"""
from __future__ import annotations

import contextlib
import math
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from mcpm.config import ConfigError, ModelConfig
from mcpm.model.sharding_hints import hint_partition, hint_platform
from mcpm_kernels.dense_attention import (cached_dense_attention_xla, dense_attention_cudnn,
                                          dense_attention_splash, dense_attention_xla)
from mcpm_kernels.dense_attention.cudnn import cudnn_unsupported
from mcpm_kernels.infllmv2 import infllmv2_attention
from mcpm_kernels.infllmv2.decode import cached_sparse_attention, leading_padding

# auto on CPU: einsum up to this many keys, flash beyond. Measured on a 2-core CPU at the 0.5B
# head layout (N=16, K=2, D=64, batch 2, float32), einsum vs flash forward+backward: 2.5 vs 1.9
# ms at 64 keys, 7.5 vs 7.5 at 128, 71 vs 30 at 256, 1670 vs 350 at 1024 (forward alone:
# flash faster from 8 keys). Below 64 keys both take a few ms, and short calls stay on the
# same code as KV-cache decode.
EINSUM_MAX_KEYS = 64
# flash tiles (queries, keys) for the model: on a 2-core Xeon, fwd+bwd 10-30% faster than the
# kernel's 64 x 512 default at the 126M (T = 512), 0.5B (T = 2048) and 8B (T = 4096) layouts
FLASH_TILES = (128, 256)
# a prefill into a KV cache with more queries than this uses the flash forward (T x S scores
# otherwise); decode and short prefills use einsum over the cache
PREFILL_EINSUM_MAX_QUERIES = 64

_TARGETS: list[tuple[str, bool]] = []


@contextlib.contextmanager
def attention_target(platform: str, *, interpret: bool = False):
    """Trace the attention inside for ``platform`` (``"cpu"``, ``"gpu"``, ``"tpu"``): what
    ``auto`` picks and what is refused. ``interpret=True`` runs the Pallas kernels (splash,
    InfLLM v2 pallas) in the Pallas interpreter, so a TPU program runs on a CPU (tests)."""
    _TARGETS.append((_platform_name(platform), interpret))
    try:
        yield
    finally:
        _TARGETS.pop()


def _platform_name(platform: str) -> str:
    return {"cuda": "gpu", "rocm": "gpu"}.get(platform, platform)


def target_platform() -> tuple[str, bool]:
    """(platform, interpret Pallas kernels) the attention is traced for: an enclosing
    :func:`attention_target`, else the devices of the activation sharding hints (the mesh a
    train step is compiled for, e.g. a TPU slice from a CPU host), else
    ``jax.default_backend()``. Pallas kernels are interpreted on a CPU."""
    if _TARGETS:
        return _TARGETS[-1]
    platform = _platform_name(hint_platform() or jax.default_backend())
    return platform, platform == "cpu"


def dense_implementation(cfg: ModelConfig, *, key_len: int, packed: bool, dtype) -> str:
    """The dense implementation of a cache-less call with ``key_len`` keys (``packed``: the call
    has segment ids) in ``dtype``: ``cfg.attention_impl``, with ``auto`` resolved for the target
    platform. A combination that cannot run is a :class:`ConfigError` saying what to use."""
    impl = cfg.attention_impl
    platform, _ = target_platform()
    cudnn_why = cudnn_unsupported(dtype, cfg.head_dim)
    if impl == "auto":
        if platform == "tpu":
            return "splash"
        if platform == "gpu":
            return "flash" if packed or cudnn_why else "cudnn"
        return "einsum" if key_len <= EINSUM_MAX_KEYS else "flash"
    if impl == "cudnn":
        if platform != "gpu":
            raise ConfigError(f"model.attention_impl=cudnn needs an NVIDIA GPU, but the program "
                              f"is traced for {platform}: use model.attention_impl=flash (or "
                              "auto)")
        if packed:
            raise ConfigError(
                "model.attention_impl=cudnn cannot take segment ids (packed documents or padding): "
                "cuDNN's public attention API has none, and dropping them would attend across "
                "documents. Use model.attention_impl=flash, or auto (cuDNN for calls without "
                "segment ids, flash for the others)")
        if cudnn_why:
            fix = ("set model.compute_dtype=bfloat16" if "bfloat16" in cudnn_why
                   else "use a supported head dim")
            raise ConfigError(f"model.attention_impl=cudnn: {cudnn_why}; {fix}, or use "
                              "model.attention_impl=flash (or auto)")
    if impl == "splash" and platform != "tpu":
        raise ConfigError(f"model.attention_impl=splash is a TPU (Pallas Mosaic) kernel, but the "
                          f"program is traced for {platform}: use model.attention_impl=flash "
                          f"(or auto{', or cudnn' if platform == 'gpu' else ''})")
    return impl


def sparse_implementation(cfg: ModelConfig) -> tuple[str, bool]:
    """(InfLLM v2 implementation, interpret) of a cache-less call: ``cfg.sparse_attention_impl``
    with ``auto`` resolved (pallas on TPU, xla elsewhere); pallas on a GPU is a ConfigError."""
    impl = cfg.sparse_attention_impl
    platform, interpret = target_platform()
    if impl == "auto":
        impl = "pallas" if platform == "tpu" else "xla"
    if impl == "pallas" and platform == "gpu":
        raise ConfigError("model.sparse_attention_impl=pallas runs TPU (Pallas Mosaic) kernels, "
                          "which do not compile for a GPU: use model.sparse_attention_impl=xla "
                          "(or auto)")
    return impl, interpret


def attention_mask(q_slot_bt: jax.Array, q_seg_bt: jax.Array,
                   k_slot_bs: jax.Array, k_seg_bs: jax.Array) -> jax.Array:
    """Boolean ``[B, T, S]``: causal in slot order, same segment, never a padding key (seg 0)."""
    causal = k_slot_bs[:, None, :] <= q_slot_bt[:, :, None]
    same_doc = k_seg_bs[:, None, :] == q_seg_bt[:, :, None]
    return causal & same_doc & (k_seg_bs[:, None, :] != 0)


def _masked_softmax(scores: jax.Array, mask: jax.Array) -> jax.Array:
    """float32 softmax over the last axis where ``mask``; rows with no visible key give zeros
    (padding queries) instead of NaN."""
    scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    return jnp.where(mask, jax.nn.softmax(scores, axis=-1), 0.0)


def dense_attention(q_btnd: jax.Array, k_bskd: jax.Array, v_bskd: jax.Array,
                    mask_bts: jax.Array) -> jax.Array:
    """softmax(q k^T / sqrt(D) masked) v in float32; query head n uses kv head n // G.

    Rows with no visible key (padding queries) return zeros instead of NaN.
    """
    b, t, n, d = q_btnd.shape
    kv = k_bskd.shape[2]
    q_btkgd = q_btnd.reshape(b, t, kv, n // kv, d)
    scores = jnp.einsum("btkgd,bskd->bkgts", q_btkgd, k_bskd,
                        preferred_element_type=jnp.float32) / math.sqrt(d)
    probs = _masked_softmax(scores, mask_bts[:, None, None, :, :]).astype(v_bskd.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v_bskd)
    return out.reshape(b, t, n, d)


def dense_attention_head_major(q_btnd: jax.Array, k_bksd: jax.Array, v_bksd: jax.Array,
                               mask_bts: jax.Array) -> jax.Array:
    """:func:`dense_attention` with keys/values in the KV cache's head-major ``[B, K, S, D]``
    layout: (b, k) are the leading batch dims of both einsums, so the keys and values are read
    in place, never transposed."""
    b, t, n, d = q_btnd.shape
    kv = k_bksd.shape[1]
    q_btkgd = q_btnd.reshape(b, t, kv, n // kv, d)
    scores = jnp.einsum("btkgd,bksd->bktgs", q_btkgd, k_bksd,
                        preferred_element_type=jnp.float32) / math.sqrt(d)
    probs = _masked_softmax(scores, mask_bts[:, None, :, None, :]).astype(v_bksd.dtype)
    out = jnp.einsum("bktgs,bksd->btkgd", probs, v_bksd)
    return out.reshape(b, t, n, d)


def _needs_sparse(key_len: int, cfg: ModelConfig) -> bool:
    sparse = cfg.sparse_config
    return sparse is not None and (sparse.dense_len == -1 or key_len >= sparse.dense_len)


def sparse_possible(cfg: ModelConfig, max_len: int) -> bool:
    """Whether a KV cache of ``max_len`` slots can ever need InfLLM v2 (then it keeps compressed
    keys): a sparse_config whose ``dense_len`` is -1 or at most ``max_len``."""
    return _needs_sparse(max_len, cfg)


def _per_row(sparse_b: jax.Array, sparse_fn, dense_fn) -> jax.Array:
    """Rows where ``sparse_b`` take ``sparse_fn()``, the others ``dense_fn()`` (both ``[B, ...]``);
    only the branch(es) needed at run time are computed."""
    def mixed():
        return jnp.where(sparse_b[:, None, None, None], sparse_fn(), dense_fn())

    return jax.lax.cond(sparse_b.all(), sparse_fn,
                        lambda: jax.lax.cond(sparse_b.any(), mixed, dense_fn))


def _roll_rows(x_bt: jax.Array, shift_b: jax.Array) -> jax.Array:
    """Each row rotated left along axis 1 by its own ``shift_b`` (negative: right)."""
    return jax.vmap(lambda row, s: jnp.roll(row, -s, axis=0))(x_bt, shift_b)


def _per_shard(fn, q_btnd: jax.Array, k_btkd: jax.Array, *rest):
    """``fn(q, k, *rest)`` (``rest``: ``[B, T, K, D]`` or ``[B, T]`` arrays, or None) once per
    shard of the activation hints' mesh. XLA cannot partition a Mosaic kernel, so under a
    multi-device mesh it runs in a shard_map: rows split as the batch is, heads as the query and
    kv heads both are (else whole: a shard's query heads must map onto its own kv heads), the
    sequence whole. Outside a hint context or on one device: ``fn`` as it is."""
    part = hint_partition([(q_btnd.shape, ("batch", "length", "heads", "head_dim")),
                           (k_btkd.shape, ("batch", "length", "kv_heads", "head_dim"))])
    if part is None:
        return fn(q_btnd, k_btkd, *rest)
    mesh, (q_spec, k_spec) = part
    at = lambda spec, i: spec[i] if i < len(spec) else None
    batch = at(q_spec, 0)
    heads = at(q_spec, 2) if at(q_spec, 2) == at(k_spec, 2) else None
    heads_spec = PartitionSpec(batch, None, heads, None)
    present = [x for x in rest if x is not None]
    specs = [heads_spec if x.ndim == 4 else PartitionSpec(batch, None) for x in present]

    def per_shard(q, k, *present):
        it = iter(present)
        return fn(q, k, *(None if x is None else next(it) for x in rest))

    return jax.shard_map(per_shard, mesh=mesh, in_specs=(heads_spec, heads_spec, *specs),
                         out_specs=heads_spec, check_vma=False)(q_btnd, k_btkd, *present)


def causal_attention(q_btnd: jax.Array, k_btkd: jax.Array, v_btkd: jax.Array,
                     segment_ids_bt: jax.Array | None, cfg: ModelConfig) -> jax.Array:
    """Dense causal attention of a cache-less call (queries and keys in the same T slots) with
    the implementation :func:`dense_implementation` picks. ``segment_ids_bt``: packed documents
    (0 = padding), or None for one sequence per row."""
    b, t = q_btnd.shape[:2]
    impl = dense_implementation(cfg, key_len=k_btkd.shape[1], packed=segment_ids_bt is not None,
                                dtype=q_btnd.dtype)
    if impl == "flash":
        return dense_attention_xla(q_btnd, k_btkd, v_btkd, segment_ids_bt,
                                   q_chunk=FLASH_TILES[0], k_chunk=FLASH_TILES[1])
    if impl == "cudnn":
        return dense_attention_cudnn(q_btnd, k_btkd, v_btkd)
    if impl == "splash":
        interpret = target_platform()[1]
        return _per_shard(lambda q, k, v, seg: dense_attention_splash(q, k, v, seg,
                                                                      interpret=interpret),
                          q_btnd, k_btkd, v_btkd, segment_ids_bt)
    slot = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    seg = jnp.ones((b, t), jnp.int32) if segment_ids_bt is None else segment_ids_bt
    return dense_attention(q_btnd, k_btkd, v_btkd, attention_mask(slot, seg, slot, seg))


def _infllm_from_first_token(q_btnd, k_bskd, v_bskd, cfg, segment_ids_bt, k_pre_rope_btkd):
    """InfLLM v2 with blocks and kernels counted from each row's first real token.

    Rows with leading padding (segment id 0, as ``left_pad`` makes them) are rotated left by it
    for the InfLLM call (the padding becomes trailing, never attended) and back after; such a row
    whose own length is below ``dense_len`` gets dense attention. So a left-padded row gives the
    outputs of the sequence alone. Without leading padding (training, packing, trailing padding)
    this is the InfLLM call as it is.
    """
    sparse_cfg = cfg.sparse_config
    impl, interpret = sparse_implementation(cfg)

    def infllm(q, k, v, seg, k_pre):
        if impl == "xla":
            return infllmv2_attention(q, k, v, sparse_cfg, implementation="xla",
                                      segment_ids=seg, scoring_keys=k_pre)
        return _per_shard(lambda q, k, v, seg, k_pre: infllmv2_attention(
            q, k, v, sparse_cfg, implementation=impl, segment_ids=seg, scoring_keys=k_pre,
            interpret=interpret), q, k, v, seg, k_pre)

    plain = lambda: infllm(q_btnd, k_bskd, v_bskd, segment_ids_bt, k_pre_rope_btkd)
    if segment_ids_bt is None:
        return plain()
    t = k_bskd.shape[1]
    lead = leading_padding(segment_ids_bt)

    def padded():
        roll = lambda x: None if x is None else _roll_rows(x, lead)
        out = _roll_rows(infllm(roll(q_btnd), roll(k_bskd), roll(v_bskd), roll(segment_ids_bt),
                                roll(k_pre_rope_btkd)), -lead)
        if sparse_cfg.dense_len in (-1, 0):
            return out
        return _per_row(t - lead >= sparse_cfg.dense_len, lambda: out,
                        lambda: causal_attention(q_btnd, k_bskd, v_bskd, segment_ids_bt, cfg))

    return jax.lax.cond((lead > 0).any(), padded, plain)


def attention(q_btnd: jax.Array, k_bskd: jax.Array, v_bskd: jax.Array, cfg: ModelConfig,
              segment_ids_bt: jax.Array | None = None,
              k_pre_rope_btkd: jax.Array | None = None) -> jax.Array:
    """Causal self-attention of a cache-less call (shapes are static under jit).

    With a ``sparse_config`` and at least ``dense_len`` keys this is InfLLM v2
    (``cfg.sparse_attention_impl``), else dense (``cfg.attention_impl``). ``segment_ids_bt``:
    packed documents, 0 = padding (None: one sequence per row, which lets cuDNN take the call);
    ``k_pre_rope_btkd`` are the keys InfLLM v2 scores blocks with when ``use_nope``. InfLLM's
    blocks and kernels count from each row's first real token (leading padding does not shift
    them).
    """
    if _needs_sparse(k_bskd.shape[1], cfg):
        return _infllm_from_first_token(q_btnd, k_bskd, v_bskd, cfg, segment_ids_bt,
                                        k_pre_rope_btkd)
    return causal_attention(q_btnd, k_bskd, v_bskd, segment_ids_bt, cfg)


class SparseCacheView(NamedTuple):
    """What InfLLM v2 needs in a cached call besides the keys and values: the compressed keys
    (all layers, ``[L, B, C, K, D]``, already including the new keys), the first new slot,
    each row's leading padding slots, and the segment ids of the new queries and of every slot."""

    kernels: jax.Array
    coarse_kernels: Optional[jax.Array]
    start: jax.Array
    lead: jax.Array
    q_segment_ids: jax.Array
    k_segment_ids: jax.Array


def cached_attention(q_btnd: jax.Array, k_lbksd: jax.Array, v_lbksd: jax.Array, layer,
                     cfg: ModelConfig, start: jax.Array, q_segment_ids_bt: jax.Array,
                     k_segment_ids_bs: jax.Array,
                     sparse: SparseCacheView | None = None) -> jax.Array:
    """:func:`attention` of T new queries in slots ``start ..`` over layer ``layer`` of the KV
    cache (head-major ``[L, B, K, S, D]``, the new keys and values already written);
    ``q_segment_ids_bt`` are the new queries' segment ids, ``k_segment_ids_bs`` every slot's
    (0 = empty or padding).

    Dense: einsum over the cache for decode and short prefills (and always with
    ``attention_impl=einsum``), else the flash forward with a query offset, never a ``[T, S]``
    score array. cuDNN and splash take no query offset, so they are not used here. InfLLM v2
    applies per row: a row whose key length (its real tokens up to the last new one) is below
    ``dense_len`` is dense, exactly the cache-less dense attention; from ``dense_len`` on
    (always with ``dense_len = -1``) it is InfLLM v2 over the cache
    (:func:`mcpm_kernels.infllmv2.decode.cached_sparse_attention`, plain JAX), which needs
    ``sparse``, the compressed keys.
    """
    b, t = q_btnd.shape[:2]

    def dense():
        k = jax.lax.dynamic_index_in_dim(k_lbksd, layer, keepdims=False)
        v = jax.lax.dynamic_index_in_dim(v_lbksd, layer, keepdims=False)
        if cfg.attention_impl != "einsum" and t > PREFILL_EINSUM_MAX_QUERIES:
            return cached_dense_attention_xla(q_btnd, k, v, q_segment_ids_bt, k_segment_ids_bs,
                                              start)
        q_slot = jnp.broadcast_to(start + jnp.arange(t, dtype=jnp.int32), (b, t))
        k_slot = jnp.broadcast_to(jnp.arange(k.shape[2], dtype=jnp.int32), (b, k.shape[2]))
        mask = attention_mask(q_slot, q_segment_ids_bt, k_slot, k_segment_ids_bs)
        return dense_attention_head_major(q_btnd, k.astype(q_btnd.dtype), v.astype(q_btnd.dtype),
                                          mask)

    if not sparse_possible(cfg, k_lbksd.shape[3]):
        return dense()
    if sparse is None:
        raise ValueError("InfLLM v2 over a KV cache needs its compressed keys (sparse=)")

    def sparse_fn():
        return cached_sparse_attention(q_btnd, k_lbksd, v_lbksd, layer, sparse.kernels,
                                       sparse.coarse_kernels, sparse.start, sparse.lead,
                                       sparse.q_segment_ids, sparse.k_segment_ids,
                                       cfg.sparse_config).astype(q_btnd.dtype)

    dense_len = cfg.sparse_config.dense_len
    if dense_len in (-1, 0):
        return sparse_fn()
    key_len = sparse.start + t - sparse.lead                                     # [B]
    return _per_row(key_len >= dense_len, sparse_fn, dense)
