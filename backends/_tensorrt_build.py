"""Build a TensorRT engine (.plan) from a prepared ONNX model: a strongly typed network (precision
comes from the ONNX: Q/DQ for int8, casts or fp16 tensors for fp16), optimization profiles, a
timing cache reused across builds, a workspace limit, the builder optimization level, and a layer
report.

This file is both the code the ``tensorrt`` target runs where TensorRT and a GPU are present and
the script it writes beside the prepared ONNX where they are not: it imports only ``tensorrt``
and the standard library, and ``SETTINGS`` holds what the compile command was given, so that

    python MODEL.build.py            (on a machine with TensorRT 10+ and an NVIDIA GPU)

builds the same engine later. Flags override the settings; ``--help`` lists them.
"""

import argparse
import json
import os
import sys
import tempfile

# Written by `infoptc compile --target tensorrt`; paths are relative to this file's folder.
SETTINGS = {
    "onnx": "model.onnx",
    "plan": "model.plan",
    "profiles": {},  # input name -> [min, opt, max] shapes
    "timing_cache": "",  # a file, read before the build and written after it ("" : none)
    "workspace_mib": 0,  # 0: TensorRT's default (the device's memory)
    "optimization_level": 3,  # TensorRT's builder optimization level, 0..5
    "layer_report": "model.layers.json",
}


def build(onnx_path, plan_path, profiles=None, timing_cache="", workspace_mib=0, optimization_level=3,
          layer_report="", trt=None):
    """Build the engine; write it to ``plan_path`` (and the layer report, and the timing cache).
    Returns a summary dict. Raises RuntimeError with the parser's or builder's messages."""
    if trt is None:
        import tensorrt as trt
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    if builder is None:
        raise RuntimeError("TensorRT cannot create a builder: no usable CUDA GPU")
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise RuntimeError("TensorRT's ONNX parser failed: " + "; ".join(errors))
    config = builder.create_builder_config()
    if workspace_mib:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_mib) << 20)
    config.builder_optimization_level = int(optimization_level)
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED  # names and tactics in the layer report
    cache_bytes = b""
    if timing_cache and os.path.exists(timing_cache):
        with open(timing_cache, "rb") as f:
            cache_bytes = f.read()
    cache = config.create_timing_cache(cache_bytes)
    config.set_timing_cache(cache, ignore_mismatch=False)
    dynamic = []
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        if any(d < 0 for d in tensor.shape):
            dynamic.append(tensor.name)
    missing = [name for name in dynamic if name not in (profiles or {})]
    if missing:
        raise RuntimeError("inputs with dynamic dimensions need a profile (NAME:MIN,OPT,MAX): " + ", ".join(missing))
    if profiles:
        profile = builder.create_optimization_profile()
        for name, (lo, opt, hi) in sorted(profiles.items()):
            profile.set_shape(name, tuple(lo), tuple(opt), tuple(hi))
        config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError("TensorRT's builder failed (see its log above)")
    plan = bytes(serialized)
    _write(plan_path, plan)
    if timing_cache:
        _write(timing_cache, bytes(config.get_timing_cache().serialize()))
    summary = {"plan": str(plan_path), "bytes": len(plan), "tensorrt": getattr(trt, "__version__", "?"),
               "timing_cache": timing_cache or None, "timing_cache_reused": bool(cache_bytes),
               "profiles": profiles or {}, "workspace_mib": workspace_mib,
               "optimization_level": int(optimization_level)}
    if layer_report:
        runtime = trt.Runtime(logger)
        engine = runtime.deserialize_cuda_engine(plan)
        inspector = engine.create_engine_inspector()
        text = inspector.get_engine_information(trt.LayerInformationFormat.JSON)
        _write(layer_report, text.encode() if isinstance(text, str) else bytes(text))
        summary["layer_report"] = str(layer_report)
        try:
            summary["layers"] = len(json.loads(text).get("Layers", []))
        except (ValueError, AttributeError):
            pass
    return summary


def _write(path, data):
    """Atomically: a temporary file beside ``path``, renamed into place."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def main(argv=None):
    here = os.path.dirname(os.path.abspath(__file__))

    def local(path):
        return path if not path or os.path.isabs(path) else os.path.join(here, path)

    p = argparse.ArgumentParser(description="Build a TensorRT engine from the prepared ONNX beside this script.")
    p.add_argument("--onnx", default=local(SETTINGS["onnx"]))
    p.add_argument("--plan", default=local(SETTINGS["plan"]))
    p.add_argument("--timing-cache", default=local(SETTINGS["timing_cache"]))
    p.add_argument("--workspace-mib", type=int, default=SETTINGS["workspace_mib"])
    p.add_argument("--optimization-level", type=int, default=SETTINGS["optimization_level"], choices=range(6))
    p.add_argument("--layer-report", default=local(SETTINGS["layer_report"]))
    args = p.parse_args(argv)
    try:
        summary = build(args.onnx, args.plan, SETTINGS["profiles"], args.timing_cache, args.workspace_mib,
                        args.optimization_level, args.layer_report)
    except ImportError:
        print("error: the tensorrt package is not installed (pip install tensorrt)", file=sys.stderr)
        return 5
    except RuntimeError as e:
        print("error: " + str(e), file=sys.stderr)
        return 4
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
