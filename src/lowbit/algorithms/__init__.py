"""Algorithms: pure functions on tensors that take a ``QuantSpec`` (or its parts) and a weight."""
