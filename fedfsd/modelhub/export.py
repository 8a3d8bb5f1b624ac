"""`fedfsd model export`: one self-contained graph for the vehicle's inference stack.

The exported graph maps what the vehicle has to what it needs: for the MLP, the 45 object-list
features in physical units (docs/data-format.md, "Features and labels"; the graph divides by the
fixed scales and clips as featurisation does), for the BEV CNN the raw uint8 raster stack; out
come physical predictions (metres, m/s²). The MLP's constant-velocity prior is a non-persistent
buffer, absent from the weights file: the export builds it exactly as the region does
(`fedfsd.privacy.objective.model_kwargs`), so the graph holds it. Parity is checked against the
torch model on frames: the maximum absolute difference in physical units is reported.
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path
from typing import Any, cast

import numpy as np

from fedfsd.errors import InputError
from fedfsd.modelhub.meta import LoadedModel, build_kwargs

FORMATS = ("onnx", "torchscript")
ONNX_OPSET = 17
PARITY_FRAMES = 512


class ExportError(InputError, ValueError):
    """The model cannot be exported as asked (format, missing dependency)."""


def torch_model(model: LoadedModel) -> Any:
    """The registry model with the file's weights and (MLP) the region's constant-velocity prior."""
    from fedfsd.models import build_model, set_weights

    arch = model.architecture
    kw: dict[str, Any] = build_kwargs(arch)
    if model.name == "mlp" and model.feature_schema is not None:
        from fedfsd.data.feature_spec import LABEL_SCALES, constant_velocity_labels

        eye = np.eye(arch["n_features"], dtype=np.float32)
        kw["prior"] = (constant_velocity_labels(eye) / np.asarray(LABEL_SCALES, np.float32)).astype(
            np.float32
        )
    net = build_model(model.name, arch["n_features"], arch["n_labels"], **kw)
    set_weights(net, model.weights)
    return net.eval()


def deployable(model: LoadedModel) -> Any:
    """nn.Module: raw inputs → physical predictions (scaling, clipping, prior, label scales)."""
    import torch
    from torch import nn

    from fedfsd.data.feature_spec import LABEL_SCALES

    net = torch_model(model)
    schema = model.feature_schema
    n_in = model.architecture["n_features"]
    if schema is not None:
        scales = np.asarray(schema["feature_scales"], np.float32)
        lo, hi = np.full(n_in, -np.inf, np.float32), np.full(n_in, np.inf, np.float32)
        for name, (a, b) in schema.get("clipped", {}).items():
            lo[schema["features"].index(name)], hi[schema["features"].index(name)] = a, b
    else:  # features the schema does not name: the graph takes them as the model does
        scales = np.ones(n_in, np.float32)
        lo, hi = np.full(n_in, -np.inf, np.float32), np.full(n_in, np.inf, np.float32)
    is_mlp = model.name == "mlp"

    class Deployable(nn.Module):
        """Why one module: the vehicle must not re-implement scaling; it ships in the graph."""

        def __init__(self) -> None:
            super().__init__()
            self.net = net
            self.register_buffer("label_scales", torch.tensor(LABEL_SCALES, dtype=torch.float32))
            self.register_buffer("feature_scales", torch.from_numpy(scales))
            self.register_buffer("lo", torch.from_numpy(np.maximum(lo, -3.0e38)))
            self.register_buffer("hi", torch.from_numpy(np.minimum(hi, 3.0e38)))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if is_mlp:
                scales, lo, hi = (
                    cast(torch.Tensor, self.feature_scales),
                    cast(torch.Tensor, self.lo),
                    cast(torch.Tensor, self.hi),
                )
                x = torch.maximum(torch.minimum(x / scales, hi), lo)
            else:
                x = x.float() / 255.0
            return self.net(x) * self.label_scales

    return Deployable().eval()


def parity_inputs(model: LoadedModel, frames: Any | None, n: int = PARITY_FRAMES) -> tuple:
    """(raw inputs for the exported graph, torch-model inputs, source) on up to n frames."""
    import torch

    if frames is not None and frames.n_frames:
        idx = np.linspace(0, frames.n_frames - 1, min(n, frames.n_frames)).astype(np.int64)
        if model.name == "bev_cnn":
            raw = np.ascontiguousarray(frames.bev[idx])
            return raw, torch.from_numpy(raw.astype(np.float32) / 255.0), "dataset frames"
        scaled = frames.features[idx]
        source = "dataset frames"
    else:
        rng = np.random.default_rng(0)
        if model.name == "bev_cnn":
            shape = (n, model.architecture["in_channels"], 48, 128)
            raw = rng.integers(0, 256, size=shape, dtype=np.uint8)
            return raw, torch.from_numpy(raw.astype(np.float32) / 255.0), "random rasters"
        scaled = rng.uniform(-1.0, 1.0, size=(n, model.architecture["n_features"]))
        source = "random features in [-1, 1]"
    scaled = np.asarray(scaled, np.float32)
    schema = model.feature_schema
    for name, (a, b) in (schema or {}).get("clipped", {}).items():  # featurisation's ranges
        assert schema is not None
        col = schema["features"].index(name)
        scaled[:, col] = np.clip(scaled[:, col], a, b)
    scales = np.asarray(schema["feature_scales"], np.float32) if schema else 1.0
    raw = (scaled * scales).astype(np.float32)
    return raw, torch.from_numpy(scaled), source


def _write_onnx(module: Any, example: Any, out: Path, bev: bool) -> None:
    import torch

    try:
        import onnx  # noqa: F401 - the legacy exporter needs it
    except ImportError:
        raise ExportError("ONNX export needs `pip install 'fedfsd[export]'` (onnx)") from None
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.onnx.export(
        module,
        (example,),
        str(out),
        dynamo=False,
        input_names=["bev_uint8" if bev else "features_raw"],
        output_names=["predictions"],
        dynamic_axes={"bev_uint8" if bev else "features_raw": {0: "n"}, "predictions": {0: "n"}},
        opset_version=ONNX_OPSET,
    )


def _run_onnx(path: Path, raw: np.ndarray) -> np.ndarray:
    try:
        import onnxruntime as ort
    except ImportError:
        raise ExportError(
            "ONNX parity check needs `pip install 'fedfsd[export]'` (onnxruntime)"
        ) from None
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    return np.asarray(sess.run(None, {name: raw})[0])


def export_model(
    model: LoadedModel, fmt: str, out: str | Path, frames: Any | None = None
) -> dict[str, Any]:
    """Write the graph, reload it, compare with the torch model; returns the export facts."""
    import torch

    from fedfsd.privacy.objective import predict_physical

    if fmt not in FORMATS:
        raise ExportError(f"--format must be one of {', '.join(FORMATS)}, not {fmt!r}")
    out = Path(out)
    module = deployable(model)
    raw, scaled, source = parity_inputs(model, frames)
    example = torch.from_numpy(raw[: min(len(raw), 4)])
    bev = model.name == "bev_cnn"
    t0 = time.perf_counter()
    with warnings.catch_warnings():  # the tracer's notes on GroupNorm's batch check, the
        warnings.simplefilter("ignore")  # legacy exporter's deprecation: parity is checked below
        got, runtime = _write_and_run(module, example, out, raw, fmt, bev)
    with torch.no_grad():
        want = predict_physical(torch_model(model), scaled).numpy()
    diff = float(np.max(np.abs(got.astype(np.float64) - want.astype(np.float64))))
    return {
        "format": fmt,
        "file": out.name,
        "bytes": out.stat().st_size,
        "input": {
            "name": "bev_uint8" if bev else "features_raw",
            "shape": ["n", *raw.shape[1:]],
            "dtype": str(raw.dtype),
            "meaning": "BEV raster stack, uint8 (docs/data-format.md)"
            if bev
            else "object-list features in physical units (docs/data-format.md); the graph "
            "divides by feature_scales and clips",
        },
        "output": {"name": "predictions", "shape": ["n", int(want.shape[1])], "units": "physical"},
        "opset": ONNX_OPSET if fmt == "onnx" else None,
        "parity": {
            "runtime": runtime,
            "frames": len(raw),
            "source": source,
            "max_abs_diff": diff,
        },
        "seconds": round(time.perf_counter() - t0, 3),
    }


def _write_and_run(
    module: Any, example: Any, out: Path, raw: np.ndarray, fmt: str, bev: bool
) -> tuple[np.ndarray, str]:
    """Write the graph in `fmt`, load it back with its own runtime, run it on `raw`."""
    import torch

    if fmt == "onnx":
        _write_onnx(module, example, out, bev)
        return _run_onnx(out, raw), "onnxruntime"
    with torch.no_grad():
        traced = torch.jit.trace(module, (example,), check_trace=False)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.jit.save(traced, str(out))
    loaded = torch.jit.load(str(out))
    with torch.no_grad():
        return loaded(torch.from_numpy(raw)).numpy(), "torch.jit"
