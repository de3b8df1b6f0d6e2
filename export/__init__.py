"""Export a trained classifier to ONNX with its metadata, and check parity with torch."""
