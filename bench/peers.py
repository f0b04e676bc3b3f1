"""The peers of ``bench/bench.py --peers``: ONNX Runtime and OpenVINO on the bench's own weights.

One ONNX model, exported once per work folder from the same transformers ``ViTModel`` the bench
compares against (``torch.onnx.export``, batch axis dynamic), feeds every peer:

    ort-fp32   ONNX Runtime, CPU execution provider, float32, all graph optimisations
    ort-int8   the same after ``onnxruntime.quantization.quantize_dynamic`` (int8 weights per
               channel, activations quantised at run time: the int8 a user of ONNX Runtime gets)
    ov-fp32    OpenVINO on the CPU with ``INFERENCE_PRECISION_HINT`` f32
    ov-bf16    the same with bf16 (only where the CPU has bfloat16 instructions)

Each engine is a callable: (B, 3, H, W) float32 numpy (the transformers processor's pixel values)
-> (B, 197, 768) float32 numpy (last_hidden_state). ``end_to_end`` runs files to outputs the way
a user of a peer would: the transformers image processor (PIL) in batches, the engine, one
.safetensors per image. The imports of onnxruntime and openvino are inside the functions, so the
bench runs without them (pip install '.[bench]').
"""

from __future__ import annotations

import time
from pathlib import Path

ENGINES = ("ort-fp32", "ort-int8", "ov-fp32", "ov-bf16")


def available() -> dict[str, str | None]:
    """Every peer name -> None when it can run here, else the reason it cannot."""
    missing = {}
    for module in ("onnx", "onnxscript", "onnxruntime", "openvino"):
        try:
            __import__(module)
        except ImportError as e:
            missing[module] = f"{module} is not installed ({e.__class__.__name__}); pip install '.[bench]'"
    export = missing.get("onnx") or missing.get("onnxscript")
    ort = export or missing.get("onnxruntime")
    ov = export or missing.get("openvino")
    out = {"ort-fp32": ort, "ort-int8": ort, "ov-fp32": ov, "ov-bf16": ov}
    if ov is None and "BF16" not in _ov_capabilities():
        out["ov-bf16"] = "OpenVINO reports no bfloat16 on this CPU"
    return out


def _ov_capabilities() -> list[str]:
    import openvino as ov

    return list(ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"))


def export_onnx(weights: Path, work: Path) -> Path:
    """``work/peers/vit.onnx``: the transformers ViTModel at ``weights`` (SDPA attention, no pooler),
    input ``pixel_values`` (B, 3, H, W) float32 with B dynamic, output ``last_hidden_state``.
    Exported once; later calls reuse the file."""
    path = Path(work) / "peers" / "vit.onnx"
    if path.exists():
        return path
    import torch
    from transformers import ViTModel

    path.parent.mkdir(parents=True, exist_ok=True)
    model = ViTModel.from_pretrained(weights, attn_implementation="sdpa", add_pooling_layer=False).eval()
    size = model.config.image_size
    example = torch.zeros(2, 3, size, size)
    tmp = path.with_suffix(".tmp.onnx")

    class Hidden(torch.nn.Module):
        def __init__(self, vit):
            super().__init__()
            self.vit = vit

        def forward(self, pixel_values):
            return self.vit(pixel_values=pixel_values).last_hidden_state

    with torch.inference_mode():
        torch.onnx.export(Hidden(model), (example,), str(tmp), input_names=["pixel_values"],
                          output_names=["last_hidden_state"], dynamo=True, external_data=False,
                          dynamic_shapes={"pixel_values": {0: torch.export.Dim("batch")}})
    tmp.replace(path)
    return path


def _quantized(onnx_path: Path) -> Path:
    """ONNX Runtime's dynamic int8 of ``onnx_path`` (QInt8 weights, per channel), made once."""
    path = onnx_path.with_name("vit-int8.onnx")
    if path.exists():
        return path
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.shape_inference import quant_pre_process

    pre = onnx_path.with_name("vit-pre.onnx")
    quant_pre_process(str(onnx_path), str(pre), skip_symbolic_shape=True)  # the processing ORT recommends first
    tmp = path.with_suffix(".tmp.onnx")
    quantize_dynamic(str(pre), str(tmp), weight_type=QuantType.QInt8, per_channel=True)
    tmp.replace(path)
    return path


def _ort(path: Path, threads: int):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return lambda x: session.run(["last_hidden_state"], {"pixel_values": x})[0]


def _openvino(path: Path, threads: int, precision: str):
    import openvino as ov

    config = {"INFERENCE_PRECISION_HINT": precision, "INFERENCE_NUM_THREADS": threads,
              "PERFORMANCE_HINT": "LATENCY"}
    compiled = ov.Core().compile_model(str(path), "CPU", config)
    request = compiled.create_infer_request()
    return lambda x: request.infer({"pixel_values": x})[compiled.output(0)].copy()


def make_engine(name: str, weights: Path, work: Path, *, threads: int):
    """The peer ``name`` (one of ENGINES) on the transformers weights at ``weights``, using
    ``threads`` intra-op threads. Returns engine(x: (B, 3, H, W) float32) -> (B, T, D) float32.
    Raises ValueError for an unknown name, ImportError when its package is missing."""
    onnx_path = export_onnx(Path(weights), Path(work))
    if name == "ort-fp32":
        return _ort(onnx_path, threads)
    if name == "ort-int8":
        return _ort(_quantized(onnx_path), threads)
    if name in ("ov-fp32", "ov-bf16"):
        return _openvino(onnx_path, threads, "f32" if name == "ov-fp32" else "bf16")
    raise ValueError(f"unknown peer {name!r}: one of {', '.join(ENGINES)}")


def end_to_end(engine, files: list[Path], out: Path, weights: Path, *, batch_size: int) -> dict:
    """Files to outputs with a peer, as its user would write it: the transformers image processor
    (PIL backend) on ``batch_size`` images at a time, the engine, one .safetensors per image
    (key ``embedding``, (T, D) float32). {"images": n, "seconds": wall time of the loop}."""
    import numpy as np
    from PIL import Image
    from safetensors.numpy import save_file

    try:
        from transformers import ViTImageProcessorPil as Processor
    except ImportError:
        from transformers import ViTImageProcessor as Processor
    processor = Processor.from_pretrained(weights)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    for i in range(0, len(files), batch_size):
        chunk = files[i : i + batch_size]
        images = [Image.open(f).convert("RGB") for f in chunk]
        x = processor(images=images, return_tensors="np")["pixel_values"].astype(np.float32)
        hidden = engine(x)
        for f, h in zip(chunk, hidden):
            save_file({"embedding": np.ascontiguousarray(h, dtype=np.float32)}, str(out / (f.name + ".safetensors")))
    return {"images": len(files), "seconds": time.perf_counter() - start}
