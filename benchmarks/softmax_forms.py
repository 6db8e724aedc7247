"""The ``softmax-forms`` suite: per-op timings of the exported post-Softmax code forms on one real
attention map, in onnxruntime and OpenVINO.

The map is the post-Softmax input of one attention module of the shared DeiT-Tiny, quantized with
the dopq recipe at the first width of ``--bits`` (TanQ below 8 bits), for a batch of 32 images.
Each form is a small graph ``Softmax -> form`` over the map's logits, exported as dopq exports it:

* ``softmax``: the float model's step alone (the reference);
* ``uniform``: a uniform b-bit Q/DQ (the ``dopq+uniform-softmax`` recipe);
* ``closed``: TanQ's closed form (``Tan``, two ``Atan``: dopq's earlier export);
* ``counted``: the code counted against the quantizer's decision points, then one ``Gather``
  (the OpenVINO target's form up to 4 bits, which OpenVINO fuses into one pass);
* ``indexed``: thresholds on the 2^-16 grid (dopq's default), the level read from the table of the
  element's grid cell (``Mul -> Cast -> GatherElements``: the onnxruntime target's form, and
  OpenVINO's above 4 bits).

Timings are medians of interleaved repeats in one run; the JSON records the CPU and its integer ISA.
Each form's output is checked against the simulated quantizer (identical levels, or the share
that differs).
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from deploy import timed_runs
from dopq.api import quantize
from dopq.config import get_preset
from dopq.environment import command_line
from dopq.export import OnnxModel
from dopq.export.matmul import SoftmaxLevels
from dopq.export.openvino_runtime import compile_model
from dopq.export.symbolic import counted_levels, qdq, tan_levels
from dopq.modules import QuantMatMul
from dopq.quantizers import TanQQuantizer, UniformQuantizer


class _SoftmaxThen(nn.Module):
    def __init__(self, step: nn.Module | None) -> None:
        super().__init__()
        self.step = step

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        p = torch.softmax(logits, dim=-1)
        return p if self.step is None else self.step(p)


class _Fn(nn.Module):
    def __init__(self, fn: Any) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)


def _attention_map(args: argparse.Namespace, workload, bits: int) -> tuple[torch.Tensor, TanQQuantizer]:
    """Logits of one attention map (batch 32) and its calibrated TanQ quantizer."""
    work = workload(args, "deit_tiny_patch16_224")
    model = copy.deepcopy(work.model)
    quantize(model, work.calib_images, get_preset("dopq", w_bits=bits, a_bits=bits), progress=False)
    modules = [m for m in model.modules() if isinstance(m, QuantMatMul)]
    target = next(m for m in modules if isinstance(m.quantizer_a, TanQQuantizer) and m.quantizer_a.enabled)
    seen: list[torch.Tensor] = []
    hook = target.quantizer_a.register_forward_pre_hook(lambda _m, inputs: seen.append(inputs[0].detach()))
    with torch.no_grad():
        model(work.calib_images[:32])
    hook.remove()
    probabilities = seen[0]
    return torch.log(probabilities.clamp_min(1e-30)), target.quantizer_a


def _forms(q: TanQQuantizer, probabilities: torch.Tensor) -> dict[str, nn.Module]:
    uniform = UniformQuantizer(q.bits)
    uniform.observing = True
    uniform(probabilities)
    scale, zero = float(uniform.scale), int(uniform.zero_point)
    c, m, d = q.warp_params()
    # counted at every width (the export counts only up to COUNTED_LEVELS_MAX_BITS)
    counted, points = q.lookup_table().float(), q.decision_points().double().tolist()
    return {
        "softmax": _SoftmaxThen(None),
        "uniform": _SoftmaxThen(_Fn(lambda p: qdq(p, scale, zero, q.bits))),
        "closed": _SoftmaxThen(_Fn(lambda p: tan_levels(p, c, m, d, q.bits))),
        "counted": _SoftmaxThen(_Fn(lambda p: counted_levels(p, counted, points))),
        "indexed": _SoftmaxThen(SoftmaxLevels(q, target="onnxruntime")),
    }


def _export(module: nn.Module, x: torch.Tensor, path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (x,), str(path), dynamo=False, opset_version=21, input_names=["x"])


def _runners(path: Path, threads: int) -> dict[str, Any]:
    session = OnnxModel(path, threads).session
    request = compile_model(path, threads).create_infer_request()
    return {
        "onnxruntime": lambda a: session.run(None, {"x": a})[0],
        "openvino": lambda a: request.infer({0: a})[0].copy(),
    }


def suite_softmax_forms(args: argparse.Namespace, workload, save) -> None:
    from dopq.environment import cpu_info

    bits = args.bits[0]
    logits, q = _attention_map(args, workload, bits)
    simulated = q(torch.softmax(logits, dim=-1))
    x = logits.numpy()
    runners: dict[tuple[str, str], Any] = {}
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for form, module in _forms(q, torch.softmax(logits, -1)).items():
            path = Path(tmp) / f"{form}.onnx"
            _export(module, logits, path)
            for runtime, run in _runners(path, args.threads or 2).items():
                runners[(form, runtime)] = run
                out = torch.from_numpy(run(x))
                same = _same_level(form, out, simulated)
                rows.append({"form": form, "runtime": runtime, "identical_to_simulation": same})
        times = timed_runs(runners, x, args.repeats)
    for row in rows:
        row["ms"] = times[(row["form"], row["runtime"])] * 1e3
    save(
        f"softmax_forms{args.suffix}",
        {
            "command": command_line(),
            "threads": args.threads or 2,
            "bits": bits,
            "map_shape": list(logits.shape),
            "tanq": dict(zip(("sharpness", "center", "clip"), q.warp_params(), strict=True)),
            "cpu": cpu_info(),
            "rows": rows,
        },
    )


def _same_level(form: str, out: torch.Tensor, simulated: torch.Tensor) -> float | None:
    """Share of elements at the simulated level: bit for bit for the counted form (the table's
    values; the indexed form's table holds them too), up to the level formula's float rounding for
    the closed form."""
    if form in ("counted", "indexed"):
        return (out == simulated).float().mean().item()
    if form == "closed":
        return torch.isclose(out, simulated, rtol=1e-5, atol=1e-7).float().mean().item()
    return None
