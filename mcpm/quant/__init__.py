"""Ternary (BitCPM4) weight quantization: absmean quantizer, STE, and 2-bit / base-3 packing.

See :mod:`mcpm.quant.ternary` for the scale layout and :mod:`mcpm.quant.pack` for the byte
formats."""
from mcpm.quant.pack import (FORMATS, check_rows, pack, pack_rows, packed_nbytes, packed_rows,
                             unpack, unpack_rows)
from mcpm.quant.ternary import QuantError, dequantize, ternarize, ternary_ste

__all__ = ["FORMATS", "QuantError", "check_rows", "dequantize", "pack", "pack_rows",
           "packed_nbytes", "packed_rows", "ternarize", "ternary_ste", "unpack", "unpack_rows"]
