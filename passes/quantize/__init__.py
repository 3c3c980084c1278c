"""int8 quantization: calibration (observers over the model's activations), static QDQ insertion
for ONNX Runtime's int8 kernels, dynamic int8 weights, and the checks and reports around them."""

from . import quantize_int8, quantize_int8_dynamic  # noqa: F401  (the passes register on import)
