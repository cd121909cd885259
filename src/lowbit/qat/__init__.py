"""Quantization-aware training: trainable fake quantization (STE, LSQ) over any registered format.

``prepare`` swaps a model's targeted Linear layers for ``FakeQuantLinear``; ``finetune`` trains
their learned scales (and optionally weights) on token windows; ``freeze_model`` turns them back
into ordinary modules holding the ``QuantizedTensor`` post-training quantization writes.
"""
from lowbit.qat.fakequant import LEARNABLE_FAMILIES, check_learnable, fake_quantize, fake_quantize_blocks  # noqa: F401
from lowbit.qat.layer import FakeQuantLinear, fake_quant_layers, float_weights, freeze_model, prepare  # noqa: F401
from lowbit.qat.train import evaluate, finetune, window_loss  # noqa: F401
