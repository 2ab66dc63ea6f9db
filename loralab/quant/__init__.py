"""Quantized frozen bases for QLoRA: NF4 codes (nf4), the NF4Linear layer (linear) and whole models (model)."""

from .linear import NF4Linear
from .model import dequantize_model, load_quantized, model_footprint, quantize_model, save_quantized
from .nf4 import dequantize_nf4, quantize_nf4
from .state import NF4State

__all__ = ["quantize_nf4", "dequantize_nf4", "NF4State", "NF4Linear", "quantize_model", "model_footprint",
           "save_quantized", "load_quantized", "dequantize_model"]
