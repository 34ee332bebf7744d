"""Ternary (BitCPM4) weight quantization: absmean quantizer, STE, and 2-bit / base-3 packing.

See :mod:`mcpm.quant.ternary` for the scale layout and :mod:`mcpm.quant.pack` for the byte
formats."""
from mcpm.quant.pack import FORMATS, pack, packed_nbytes, unpack
from mcpm.quant.ternary import QuantError, dequantize, ternarize, ternary_ste

__all__ = ["FORMATS", "QuantError", "dequantize", "pack", "packed_nbytes", "ternarize",
           "ternary_ste", "unpack"]
