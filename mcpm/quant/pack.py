"""Byte packing of ternary weights (numpy; produces uint8 arrays).

Both formats flatten q in C order and store only the ternary values; scales travel separately.

``"tq2"`` -- 2 bits per weight, four weights per byte.  The code of a weight is ``q + 1`` in
{0, 1, 2} (code 3 is invalid).  Weight ``i`` goes into byte ``i // 4`` at bits
``2 * (i % 4)`` .. ``2 * (i % 4) + 1``, least significant pair first:
``byte = c0 | c1 << 2 | c2 << 4 | c3 << 6``.  Example: q = [-1, 0, 1, 1] -> codes [0, 1, 2, 2]
-> ``0 + 1*4 + 2*16 + 2*64 = 164``.

``"tq1"`` -- base 3, five weights per byte (1.6 bits per weight).  The trit of a weight is
``t = q + 1``; weight ``i`` is trit ``i % 5`` of byte ``i // 5`` and
``byte = sum(t_k * 3**k, k = 0..4)`` (least significant trit first), so bytes are 0..242 and any
byte > 242 is invalid.  Example: q = [-1, 0, 1, 1, 0] -> trits [0, 1, 2, 2, 1]
-> ``0 + 3 + 18 + 54 + 81 = 156``.  (Same density as llama.cpp TQ1_0 but not its bit layout.)

Padding: the tail of the last byte is filled with q = 0 (code 1 / trit 1), so a short tail
decodes to zeros.  :func:`unpack` ignores the padding's value (only rejecting invalid codes) and
checks the blob length against the shape exactly.
"""
from __future__ import annotations

import math

import numpy as np

from mcpm.quant.ternary import QuantError

FORMATS = ("tq1", "tq2")
_PER_BYTE = {"tq2": 4, "tq1": 5}
_POW3 = np.array([1, 3, 9, 27, 81], dtype=np.uint8)
_SHIFT2 = np.array([0, 2, 4, 6], dtype=np.uint8)


def _check_fmt(fmt) -> int:
    if fmt not in _PER_BYTE:
        raise QuantError(f"unknown ternary packing format {fmt!r}: use 'tq2' (2 bits per "
                         f"weight, four per byte) or 'tq1' (base 3, five per byte)")
    return _PER_BYTE[fmt]


def packed_nbytes(n: int, fmt: str) -> int:
    """Number of bytes :func:`pack` produces for ``n`` weights: ceil(n/4) for tq2, ceil(n/5)
    for tq1."""
    per = _check_fmt(fmt)
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise QuantError(f"number of weights must be a non-negative int, got {n!r}")
    return -(-int(n) // per)


def pack(q, fmt: str = "tq2") -> np.ndarray:
    """Pack ternary values (any shape, values exactly in {-1, 0, 1}) into a uint8 array."""
    per = _check_fmt(fmt)
    a = np.asarray(q)
    if a.dtype == np.bool_ or not (np.issubdtype(a.dtype, np.integer)
                                   or np.issubdtype(a.dtype, np.floating)):
        raise QuantError(f"pack expects integer ternary values, got dtype {a.dtype}")
    flat = a.reshape(-1)
    ok = (flat == -1) | (flat == 0) | (flat == 1)
    if not np.all(ok):
        bad = flat[~ok]
        raise QuantError(f"pack expects values in {{-1, 0, 1}}; found {bad.size} other "
                         f"value(s), e.g. {bad[:5].tolist()} (ternarize the weight first)")
    n = flat.size
    nbytes = -(-n // per)
    codes = np.ones(nbytes * per, dtype=np.uint8)            # padding: q = 0
    codes[:n] = (flat.astype(np.int8) + 1).astype(np.uint8)
    codes = codes.reshape(nbytes, per)
    if fmt == "tq2":
        out = np.bitwise_or.reduce(codes << _SHIFT2, axis=1)
    else:
        out = (codes * _POW3).sum(axis=1, dtype=np.uint16)
    return out.astype(np.uint8)


def _as_bytes(blob) -> np.ndarray:
    if isinstance(blob, (bytes, bytearray, memoryview)):
        return np.frombuffer(bytes(blob), dtype=np.uint8)
    a = np.asarray(blob)
    if a.dtype != np.uint8:
        raise QuantError(f"packed blob must be bytes or a uint8 array, got dtype {a.dtype}")
    return a.reshape(-1)


def unpack(blob, shape, fmt: str = "tq2") -> np.ndarray:
    """Inverse of :func:`pack`: int8 array of ``shape`` with values in {-1, 0, 1}.

    Raises QuantError when the blob's length does not match the shape (truncated or wrong
    blob) or it holds an invalid byte (tq2 code 3; tq1 byte > 242)."""
    per = _check_fmt(fmt)
    try:
        shape = tuple(int(s) for s in (shape if isinstance(shape, (tuple, list)) else
                                       tuple(shape)))
    except TypeError:
        shape = (int(shape),)
    if any(s < 0 for s in shape):
        raise QuantError(f"invalid shape {shape}")
    n = math.prod(shape)
    b = _as_bytes(blob)
    expected = -(-n // per)
    if b.size != expected:
        raise QuantError(f"{fmt} blob for shape {shape} ({n} weights) must be {expected} "
                         f"bytes, got {b.size}: the blob is truncated, corrupt or for another "
                         f"shape/format")
    if fmt == "tq2":
        codes = (b[:, None] >> _SHIFT2) & 3
        if np.any(codes == 3):
            pos = int(np.argmax(np.any(codes == 3, axis=1)))
            raise QuantError(f"corrupt tq2 blob: byte {pos} (value {int(b[pos])}) holds the "
                             f"invalid 2-bit code 3")
    else:
        if np.any(b > 242):
            pos = int(np.argmax(b > 242))
            raise QuantError(f"corrupt tq1 blob: byte {pos} has value {int(b[pos])} > 242 "
                             f"(five trits encode at most 3**5 - 1 = 242)")
        codes = (b[:, None] // _POW3) % 3
    q = codes.reshape(-1)[:n].astype(np.int8) - 1
    return q.reshape(shape)


# --------------------------------------------------------------------------------------------
# Row-planar layout of matrices: what packed checkpoints store and the matmuls unpack.
# --------------------------------------------------------------------------------------------
# A weight ``[..., K, N]`` (K the input axis) is packed into ``[..., R, N]`` bytes with
# ``R = ceil(K / per)``: byte ``[r, n]`` holds rows ``r, R + r, 2R + r, ...`` of column n, as
# code/trit ``j`` for row ``j*R + r`` (the same bit and trit order as :func:`pack`); rows >= K
# are padding (q = 0). Unpacking is then ``per`` shifts (or divisions) of the whole byte matrix
# and one concatenation along K: no interleaving, so a kernel that holds R' byte rows of a tile
# multiplies them against ``per`` contiguous column blocks of its input.

def packed_rows(k: int, fmt: str) -> int:
    """R: byte rows of a K-row matrix in the row-planar layout."""
    return -(-int(k) // _check_fmt(fmt))


def pack_rows(q, fmt: str = "tq2") -> np.ndarray:
    """Ternary ``q [..., K, N]`` (values in {-1, 0, 1}) -> uint8 ``[..., ceil(K/per), N]`` in the
    row-planar layout (see above)."""
    per = _check_fmt(fmt)
    a = np.asarray(q)
    if a.ndim < 2:
        raise QuantError(f"pack_rows expects a matrix [..., K, N], got shape {a.shape}")
    ok = (a == -1) | (a == 0) | (a == 1)
    if not np.all(ok):
        raise QuantError(f"pack_rows expects values in {{-1, 0, 1}}; found {int((~ok).sum())} "
                         "other value(s) (ternarize the weight first)")
    k = a.shape[-2]
    r = -(-k // per)
    codes = np.ones(a.shape[:-2] + (per * r, a.shape[-1]), np.uint8)
    codes[..., :k, :] = (a.astype(np.int8) + 1).astype(np.uint8)
    planes = codes.reshape(a.shape[:-2] + (per, r, a.shape[-1]))
    if fmt == "tq2":
        out = np.zeros(planes.shape[:-3] + planes.shape[-2:], np.uint8)
        for j in range(per):
            out |= planes[..., j, :, :] << np.uint8(2 * j)
    else:
        out = np.zeros(planes.shape[:-3] + planes.shape[-2:], np.uint16)
        for j in range(per):
            out += planes[..., j, :, :].astype(np.uint16) * int(_POW3[j])
    return out.astype(np.uint8)


def check_rows(packed, fmt: str, what: str = "packed weight") -> None:
    """Refuse bytes that no ternary matrix packs to (tq2 code 3, tq1 byte > 242)."""
    _check_fmt(fmt)
    b = np.asarray(packed)
    if b.dtype != np.uint8:
        raise QuantError(f"{what}: expected uint8 bytes, got {b.dtype}")
    if fmt == "tq2":
        bad = np.zeros(b.shape, bool)
        for j in range(4):
            bad |= ((b >> np.uint8(2 * j)) & 3) == 3
    else:
        bad = b > 242
    if bad.any():
        idx = tuple(int(i) for i in np.argwhere(bad)[0])
        raise QuantError(f"corrupt {fmt} {what}: byte {idx} (value {int(b[idx])}) is not a "
                         "packed ternary value")


def unpack_rows(packed, k: int, fmt: str = "tq2", dtype=None):
    """Inverse of :func:`pack_rows` in jax.numpy (traceable: unpacks inside a jitted step):
    uint8 ``[..., R, N]`` -> ``[..., K, N]`` with values -1, 0, 1 in ``dtype`` (default int8).
    Bytes are not validated here (:func:`check_rows` does that when a file is read)."""
    import jax.numpy as jnp

    per = _check_fmt(fmt)
    p = jnp.asarray(packed)
    if fmt == "tq2":
        planes = [((p >> (2 * j)) & 3) for j in range(per)]
    else:
        planes = [((p // int(_POW3[j])) % 3) for j in range(per)]
    q = jnp.concatenate(planes, axis=-2)[..., :k, :]
    return (q.astype(jnp.int8) - 1).astype(dtype or jnp.int8)
