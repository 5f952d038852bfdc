"""Weights for deployment: the int8 ONNX trunk (quantize) and smaller heads (compress). Imports viz and below; not training or evaluation."""
