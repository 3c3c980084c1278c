"""int8 quantization: calibration (observers over the model's activations), static QDQ insertion
for ONNX Runtime's int8 kernels, dynamic int8 weights, the accuracy-recovery passes that run
before them (cross-layer equalization, bias correction, SmoothQuant), and the checks and
reports around them. ``infoptc.passes`` imports every module here; the passes register then.

    quantize_int8.py          the static pass: plan.py (what) -> calibration.py (ranges) -> qdq.py (rewrite)
    quantize_int8_dynamic.py  the dynamic pass
    correct_bias.py, equalize_cross_layer.py, smooth_quant.py   accuracy recovery
    observers.py  recipe.py  speed.py  fusion_check.py  common.py
    convert_float.py          fp32 -> fp16/bf16 (sensitive ops kept fp32, Casts at region borders)
    quantize_int4.py          block-wise int4 weights: ORT's MatMulNBits or int4 DequantizeLinear; rtn, gptq
"""
