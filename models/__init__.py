"""Fixture ONNX models: decomposed LayerNorm/RMSNorm patterns and look-alikes (see models.patterns)."""
