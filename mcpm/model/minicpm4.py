"""The MiniCPM4 decoder in Flax NNX (spec section 2).

Conventions: B batch, T new positions, S cache slots, H hidden, D head_dim, N query heads,
K kv heads, I intermediate, V vocab, L layers. Layer weights are stacked along a leading L axis
and applied with ``jax.lax.scan`` (one compiled layer body whatever the depth, optional remat).
Every parameter carries logical axis names in ``out_sharding`` metadata for the mesh rules of training.

Weight layouts (HF's torch Linear stores [out, in]; mcpm stores [in, out] split into heads):
``embed [V,H]``, ``q [L,H,N,D]``, ``k,v [L,H,K,D]``, ``o [L,N,D,H]``, ``gate,up [L,H,I]``,
``down [L,I,H]``, norms ``[L,H]`` / ``[H]``, ``lm_head [H,V]`` (untied models only).

A model built with ``packing=`` (what :func:`mcpm.from_pretrained` makes of a packed ternary
checkpoint, :mod:`mcpm.quant.packed`) holds each packed layer matrix NAME as ternary bytes
``NAME_packed [L, R, out]`` (the row-planar layout of :mod:`mcpm.quant.pack`, of the
``[in, out]`` matrix view) and its scales ``NAME_scale`` (``[L, 1, 1]`` or ``[L, in/g, out]``),
both :class:`PackedTernary` state; the layer scan unpacks one layer's matrix at a time to the
compute dtype, never the whole model. In a program traced for TPU (see
:func:`mcpm.model.attention.target_platform`) a tq2 matrix the Pallas kernel takes
(:func:`mcpm_kernels.ternary.pallas_supported`) is not unpacked in HBM at all: its layer's
matmul runs :func:`mcpm_kernels.ternary.ternary_matmul_pallas`, which unpacks tiles in VMEM.
"""
from __future__ import annotations

import contextlib
import math
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mcpm.config import ModelConfig
from mcpm.model.attention import (SparseCacheView, attention, cached_attention, sparse_possible,
                                  target_platform)
from mcpm.model.layers import apply_rope, linear, rms_norm, rope_cos_sin, swiglu
from mcpm.model.sharding_hints import constrain
from mcpm.quant.pack import packed_rows, unpack_rows
from mcpm_kernels.infllmv2.decode import append_keys, compressed_cache_sizes, leading_padding
# a module reference, not its names: the kernel module imports mcpm (mcpm.quant.pack), so
# whichever of the two is imported first meets the other half-initialized
import mcpm_kernels.ternary.matmul as ternary_kernel

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def precision_scope(cfg: ModelConfig):
    """The matmul precision of float32 compute (``cfg.matmul_precision``) for everything traced
    inside: GPUs default to TF32 and TPUs to one bfloat16 pass, which put the logits ~5e-4
    relative off the official ones. bfloat16 compute is left as it is."""
    if cfg.compute_dtype != "float32":
        return contextlib.nullcontext()
    return jax.default_matmul_precision(cfg.matmul_precision)

# Logical axis names of every parameter (the training issue maps them onto a mesh).
LOGICAL_AXES = {
    "embed": ("vocab", "embed"),
    "final_norm": ("embed",),
    "lm_head": ("embed", "vocab"),
    "attn_norm": ("layers", "embed"),
    "q": ("layers", "embed", "heads", "head_dim"),
    "k": ("layers", "embed", "kv_heads", "head_dim"),
    "v": ("layers", "embed", "kv_heads", "head_dim"),
    "o": ("layers", "heads", "head_dim", "embed"),
    "mlp_norm": ("layers", "embed"),
    "gate": ("layers", "embed", "mlp"),
    "up": ("layers", "embed", "mlp"),
    "down": ("layers", "mlp", "embed"),
}

# logical axes of the residual stream: batch-parallel, the hidden dim whole on each device
# (FSDP shards the weights, not the activations); see mcpm.model.sharding_hints
RESIDUAL_AXES = ("batch", "length", None)

LAYER_PARAMS = ("attn_norm", "q", "k", "v", "o", "mlp_norm", "gate", "up", "down")


class PackedTernary(nnx.Variable):
    """Ternary weight bytes or their scales in a packed model: inference state, not a trained
    parameter (``nnx.state(model, nnx.Param)`` leaves it out)."""


class Packing(NamedTuple):
    """Which layer matrices a model holds packed, in which byte format (``"tq2"`` / ``"tq1"``)
    and with which scale groups (``group_size`` 0: one scale per matrix and layer)."""

    fmt: str
    names: tuple[str, ...]
    group_size: int = 0


def matrix_dims(name: str, shape: tuple[int, ...]) -> tuple[int, int]:
    """(in, out) of the matrix a parameter multiplies by: per layer for the stacked layer
    parameters (``o``'s input is both head axes), ``[H, V]`` for ``lm_head`` and for ``embed``
    (the tied head reads the ``[V, H]`` table transposed)."""
    if name == "embed":
        return shape[1], shape[0]
    if name == "lm_head":
        return shape[0], shape[1]
    n_in = 2 if name == "o" else 1
    return math.prod(shape[1:1 + n_in]), math.prod(shape[1 + n_in:])


def unpack_ternary(packed, scale, k: int, fmt: str, dtype):
    """``q * scale`` as ``[..., k, out]`` in ``dtype`` from row-planar bytes ``[..., R, out]``
    and scales ``[..., 1, 1]`` or ``[..., k/g, out]``. The product of a ternary value and the
    scale cast to ``dtype`` is exact, so this equals the float ternary weight cast to ``dtype``."""
    q = unpack_rows(packed, k, fmt, dtype)
    groups = scale.shape[-2]
    lead, n = q.shape[:-2], q.shape[-1]
    w = q.reshape(*lead, groups, k // groups, n) * scale.astype(dtype)[..., :, None, :]
    return w.reshape(q.shape)


class KernelTernary(NamedTuple):
    """One layer's packed tq2 matrix left packed for the Pallas kernel: bytes ``[R, out]``,
    scales ``[1, 1]`` / ``[k/g, out]``, the input length ``k``, the output dims of the stacked
    parameter (``[N, D]`` for q, ``[H]`` for o) and whether to run the Pallas interpreter."""

    packed: jax.Array
    scale: jax.Array
    k: int
    out_shape: tuple[int, ...]
    interpret: bool


def layer_matmul(x: jax.Array, w, in_dims: int = 1) -> jax.Array:
    """:func:`linear` for a float weight; for a :class:`KernelTernary` the kernel's product with
    the same shapes (x's last ``in_dims`` dims are the matrix's input)."""
    if not isinstance(w, KernelTernary):
        return linear(x, w, in_dims)
    lead = x.shape[:x.ndim - in_dims]
    # the kernel itself, not the dispatcher: a TPU program traced on another host (AOT) must
    # get it although jax.default_backend() is not "tpu" there
    y = ternary_kernel.ternary_matmul_pallas(x.reshape(-1, w.k), w.packed, w.scale, w.k,
                                             interpret=w.interpret)
    return y.reshape(*lead, *w.out_shape)


def param_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Shape of every parameter by name (layer parameters include the leading L)."""
    L, H, N, K, D, I, V = (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads,
                           cfg.num_key_value_heads, cfg.head_dim, cfg.intermediate_size,
                           cfg.vocab_size)
    shapes = {"embed": (V, H), "final_norm": (H,),
              "attn_norm": (L, H), "q": (L, H, N, D), "k": (L, H, K, D), "v": (L, H, K, D),
              "o": (L, N, D, H), "mlp_norm": (L, H), "gate": (L, H, I), "up": (L, H, I),
              "down": (L, I, H)}
    if not cfg.tie_word_embeddings:
        shapes["lm_head"] = (H, V)
    return shapes


def init_std(name: str, cfg: ModelConfig) -> float:
    """muP initialisation (spec 2.8): hidden matrices init_std / sqrt(m); embeddings init_std
    (also divided by sqrt(m) when ``mup_scale_embedding``); norms are ones."""
    m = cfg.width_mult
    if name in ("embed", "lm_head"):
        return cfg.initializer_range / (math.sqrt(m) if cfg.mup_scale_embedding else 1.0)
    return cfg.initializer_range / math.sqrt(m)


class KVCache(NamedTuple):
    """Preallocated keys and values of every layer, plus what each slot holds.

    ``k, v``: ``[L, B, K, S, D]`` (head-major: one head's slots are contiguous, the layout the
    attention einsums read without a transpose); ``segment_ids [B, S]`` (0 = empty or padding
    slot); ``index``: int32 scalar, the number of slots written so far (the same for every row).

    A model whose ``sparse_config`` can need InfLLM v2 within ``S`` slots (``dense_len`` -1 or at
    most S) also keeps its compressed keys (spec 3 "Decode", see
    :mod:`mcpm_kernels.infllmv2.decode`), counted from each row's first real token and extended
    by every call: ``kernels [L, B, C, K, D]`` float32 (slot c: the mean of kernel c's keys once
    complete), ``coarse_kernels [L, B, C', K, D]`` (with ``lse_approx``) and ``key_tail
    [L, B, R, K, D]`` (the scoring keys of the last R slots, R = largest kernel size - 1). Any
    other cache has None there: the same arrays as a dense model's.
    """

    k: jax.Array
    v: jax.Array
    segment_ids: jax.Array
    index: jax.Array
    kernels: Optional[jax.Array] = None
    coarse_kernels: Optional[jax.Array] = None
    key_tail: Optional[jax.Array] = None

    @staticmethod
    def create(cfg: ModelConfig, batch: int, max_len: int, dtype=None) -> "KVCache":
        dtype = dtype or DTYPES[cfg.compute_dtype]
        L, K, D = cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim
        shape = (L, batch, K, max_len, D)
        cache = KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype),
                        jnp.zeros((batch, max_len), jnp.int32), jnp.zeros((), jnp.int32))
        if not sparse_possible(cfg, max_len):
            return cache
        c, cc, r = compressed_cache_sizes(cfg.sparse_config, max_len)
        zeros = lambda n: jnp.zeros((L, batch, n, K, D), jnp.float32)
        return cache._replace(kernels=zeros(c), coarse_kernels=zeros(cc) if cc else None,
                              key_tail=zeros(r))

    @property
    def max_len(self) -> int:
        return self.k.shape[3]


def _remat(fn, policy: str):
    if policy == "none":
        return fn
    policies = {"full": None,
                "dots": jax.checkpoint_policies.dots_saveable,
                "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}
    return jax.checkpoint(fn, policy=policies[policy])


class MiniCPM4(nnx.Module):
    """MiniCPM4 causal LM. ``model(ids) -> float32 logits [B, T, V]``.

    With ``cache=`` (a :class:`KVCache`) the new keys/values are written at ``cache.index`` and
    ``(logits, new_cache)`` is returned: that is prefill and decode.
    """

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs, packing: Optional[Packing] = None):
        self.config = config
        self.packing = packing
        pdtype = DTYPES[config.param_dtype]
        key = rngs.params()
        shapes = param_shapes(config)
        keys = dict(zip(shapes, jax.random.split(key, len(shapes))))
        with nnx.use_eager_sharding(False):
            for name, shape in shapes.items():
                if packing is not None and name in packing.names:
                    # zero bytes and scales: a weight of zeros until a packed checkpoint fills it
                    k, n = matrix_dims(name, shape)
                    groups = k // packing.group_size if packing.group_size else 1
                    setattr(self, f"{name}_packed", PackedTernary(
                        jnp.zeros((shape[0], packed_rows(k, packing.fmt), n), jnp.uint8)))
                    setattr(self, f"{name}_scale", PackedTernary(
                        jnp.zeros((shape[0], groups, n if packing.group_size else 1),
                                  jnp.float32)))
                    continue
                if name.endswith("norm"):
                    value = jnp.ones(shape, pdtype)
                else:
                    value = (init_std(name, config)
                             * jax.random.normal(keys[name], shape, jnp.float32)).astype(pdtype)
                setattr(self, name, nnx.Param(value, out_sharding=LOGICAL_AXES[name]))

    # -- forward ---------------------------------------------------------------------------
    def __call__(self, input_ids: jax.Array, *, positions: Optional[jax.Array] = None,
                 segment_ids: Optional[jax.Array] = None, cache: Optional[KVCache] = None,
                 return_hidden: bool = False):
        """``input_ids [B, T]`` -> logits ``[B, T, V]`` (float32), or (logits, cache).

        positions ``[B, T]``: RoPE positions (default: 0.. without a cache, cache.index.. with).
        segment_ids ``[B, T]``: documents of packed sequences; 0 marks padding (default all 1).
        Attention is causal, never crosses segments and never sees padding keys.
        ``return_hidden``: return the head's input ``[B, T, H]`` instead of the logits
        (:meth:`logits` makes them), for a loss that makes the logits a piece at a time.
        """
        with precision_scope(self.config):
            return self._forward(input_ids, positions, segment_ids, cache, return_hidden)

    def logits(self, x_bth: jax.Array) -> jax.Array:
        """float32 logits ``[B, T, V]`` of head inputs (``return_hidden=True``'s output)."""
        cfg = self.config
        with precision_scope(cfg):
            cdtype = DTYPES[cfg.compute_dtype]
            if cfg.tie_word_embeddings:   # [V, H] read as it is: no transposed copy of it
                b, t, h = x_bth.shape
                logits = jnp.einsum("nh,vh->nv", x_bth.reshape(b * t, h),
                                    self.embed[...].astype(cdtype),
                                    preferred_element_type=jnp.float32).reshape(b, t, -1)
            else:
                logits = linear(x_bth, self.lm_head[...].astype(cdtype),
                                preferred_element_type=jnp.float32)
        return constrain(logits.astype(jnp.float32), ("batch", "length", "vocab"))

    def _forward(self, input_ids, positions, segment_ids, cache, return_hidden):
        cfg = self.config
        cdtype = DTYPES[cfg.compute_dtype]
        b, t = input_ids.shape
        start = jnp.zeros((), jnp.int32) if cache is None else cache.index
        q_slot = jnp.broadcast_to(start + jnp.arange(t, dtype=jnp.int32), (b, t))
        if positions is None:
            positions = q_slot
        # no [B, T, S] mask here: the attention seam builds one only where it is used (einsum,
        # decode); without segment ids a cache-less call is one causal sequence per row
        attn_segments = None if segment_ids is None else segment_ids.astype(jnp.int32)
        if segment_ids is None:
            segment_ids = jnp.ones((b, t), jnp.int32)
        segment_ids = segment_ids.astype(jnp.int32)

        compressed = None
        if cache is not None:
            new_seg = jax.lax.dynamic_update_slice(cache.segment_ids, segment_ids, (0, start))
            if sparse_possible(cfg, cache.max_len):
                if cache.kernels is None:
                    raise ValueError(
                        "this model's sparse_config needs InfLLM v2 within the cache's "
                        f"{cache.max_len} slots, but the KV cache has no compressed keys: create "
                        "it with KVCache.create(model.config, batch, max_len)")
                compressed = (cache.kernels, cache.coarse_kernels, cache.key_tail)
                lead = leading_padding(new_seg)
        cos, sin = rope_cos_sin(positions, cfg)

        h = self.embed[...][input_ids].astype(cdtype) * jnp.asarray(cfg.scale_emb, cdtype)
        h = constrain(h, RESIDUAL_AXES)
        # cast one layer at a time inside the scan: no compute-dtype copy of the whole model
        packed = self.packing.names if self.packing is not None else ()
        layer_params = {name: (getattr(self, f"{name}_packed")[...],
                               getattr(self, f"{name}_scale")[...]) if name in packed
                        else getattr(self, name)[...] for name in LAYER_PARAMS}
        shapes = param_shapes(cfg)
        r = cfg.residual_scale
        platform, interpret = target_platform()

        def layer_weight(name, w):
            """One layer's slice of parameter ``name`` as the layer's matmuls take it."""
            if name not in packed:
                return w.astype(cdtype)
            k = matrix_dims(name, shapes[name])[0]
            fmt = self.packing.fmt
            # a host array of x's dtype and length: the kernel's rules depend on nothing else
            if platform == "tpu" and ternary_kernel.pallas_supported(
                    np.zeros((1, k), cdtype), *w, k, fmt):
                n_in = 2 if name == "o" else 1
                return KernelTernary(*w, k, shapes[name][1 + n_in:], interpret)
            return unpack_ternary(*w, k, fmt, cdtype).reshape(shapes[name][1:])

        def layer(h_bth, p, kv=None):
            """One decoder layer. ``kv = (layer index, k_lbksd, v_lbksd, compressed)``: write this
            layer's new keys/values (and compressed keys, when kept) into the cache at ``start``
            and attend over all its slots."""
            p = {name: layer_weight(name, w) for name, w in p.items()}
            h_bth = constrain(h_bth, RESIDUAL_AXES)
            x = rms_norm(h_bth, p["attn_norm"], cfg.rms_norm_eps)
            q = apply_rope(layer_matmul(x, p["q"]), cos, sin)
            q = constrain(q, ("batch", "length", "heads", "head_dim"))
            k_pre = layer_matmul(x, p["k"])
            k = apply_rope(k_pre, cos, sin)
            if kv is None:
                v = layer_matmul(x, p["v"])
                o = attention(q, k, v, cfg, attn_segments, k_pre_rope_btkd=k_pre)
            else:
                i, k_lbksd, v_lbksd, comp = kv
                dtype = k_lbksd.dtype
                k_bktd = k.transpose(0, 2, 1, 3)
                v_bktd = layer_matmul(x, p["v"]).transpose(0, 2, 1, 3)
                at = (i, 0, 0, start, 0)
                k_lbksd = jax.lax.dynamic_update_slice(k_lbksd, k_bktd[None].astype(dtype), at)
                v_lbksd = jax.lax.dynamic_update_slice(v_lbksd, v_bktd[None].astype(dtype), at)
                view = None
                if comp is not None:
                    scoring = k_pre if cfg.sparse_config.use_nope else k
                    comp = append_keys(*comp, i, scoring, start, lead, cfg.sparse_config)
                    view = SparseCacheView(comp[0], comp[1], start, lead, segment_ids, new_seg)
                o = cached_attention(q, k_lbksd, v_lbksd, i, cfg, start, segment_ids, new_seg,
                                     view)
                kv = (k_lbksd, v_lbksd, comp)
            h_bth = h_bth + r * layer_matmul(o, p["o"], in_dims=2)
            x = rms_norm(h_bth, p["mlp_norm"], cfg.rms_norm_eps)
            h_bth = h_bth + r * swiglu(x, p["gate"], p["up"], p["down"], layer_matmul)
            return h_bth, kv

        if cache is None:
            body = _remat(lambda carry, p: (layer(carry, p)[0], None), cfg.remat)
            h, _ = jax.lax.scan(body, h, layer_params)
            new_cache = None
        else:
            # The whole cache rides in the scan carry and each layer writes only its T new slots
            # into it (dynamic_update_slice at the layer index), so XLA updates it in place and
            # the donated input buffer is the output. Scanning it as xs -> ys instead made XLA
            # copy every layer's cache on every decode step (time growing with B x S).
            # Inference only, so no remat here.
            def body(carry, xs):
                h_bth, k_lbksd, v_lbksd, comp = carry
                p, i = xs
                h_bth, kv = layer(h_bth, p, (i, k_lbksd, v_lbksd, comp))
                return (h_bth, *kv), None

            layer_ids = jnp.arange(cfg.num_hidden_layers, dtype=jnp.int32)
            (h, k_lbksd, v_lbksd, comp), _ = jax.lax.scan(
                body, (h, cache.k, cache.v, compressed), (layer_params, layer_ids))
            new_cache = cache._replace(k=k_lbksd, v=v_lbksd, segment_ids=new_seg, index=start + t)
            if comp is not None:
                new_cache = new_cache._replace(kernels=comp[0], coarse_kernels=comp[1],
                                               key_tail=comp[2])

        x = rms_norm(h, self.final_norm[...].astype(cdtype), cfg.rms_norm_eps)
        x = x / jnp.asarray(cfg.width_mult, cdtype)
        out = x if return_hidden else self.logits(x)
        return out if cache is None else (out, new_cache)
