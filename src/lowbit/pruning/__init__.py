"""Pruning during training and pruning-paper checks on small models trained here.

``small``: offline datasets (sklearn's digits, MNIST-5k, MNIST), small MLPs and CNNs, a seeded
training loop that keeps pruned weights at zero. The one-shot LLM pruning methods are modifiers
(``lowbit.modifiers``); their per-layer allocations are ``lowbit.algorithms.allocation``.
"""
