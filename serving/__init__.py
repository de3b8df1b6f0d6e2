"""Torch-free runtime: ONNX artifact loading, image preprocessing, batch prediction, BentoML service."""
