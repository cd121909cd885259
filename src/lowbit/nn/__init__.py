"""Inference with packed weights: ``QuantLinear`` and the CPU kernels behind it."""
from lowbit.nn.convert import kernel_counts, pack_model, place
from lowbit.nn.quant_linear import QuantLinear, choose_kernel

__all__ = ["QuantLinear", "choose_kernel", "pack_model", "place", "kernel_counts"]
