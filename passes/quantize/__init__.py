"""int8 quantization: calibration (observers over the model's activations), static QDQ insertion
for ONNX Runtime's int8 kernels, dynamic int8 weights, the accuracy-recovery passes that run
before them (cross-layer equalization, bias correction, SmoothQuant), and the checks and
reports around them."""

from . import correct_bias, equalize_cross_layer, quantize_int8, quantize_int8_dynamic, smooth_quant  # noqa: F401
