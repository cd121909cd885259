"""Inference: packed ``QuantLinear`` layers and their CPU kernels, the reference (fake-quant)
path, sparsity masks, and activation quantization."""
from lowbit.nn.activation import quantize_input
from lowbit.nn.convert import kernel_counts, pack_model, place
from lowbit.nn.quant_linear import QuantLinear, choose_kernel
from lowbit.nn.reference import attach, attach_mask, masks, qtensors, quantized_tensors

__all__ = ["QuantLinear", "choose_kernel", "pack_model", "place", "kernel_counts", "attach", "attach_mask",
           "masks", "qtensors", "quantized_tensors", "quantize_input"]
