"""Benchmarks behind docs/RESULTS.md. Each suite writes benchmarks/results/<suite>.json.

    python benchmarks/run.py foundation      # FP, RepQ-ViT W4/A4 + W3/A3 on the shared DeiT-Tiny and Swin-Tiny
    python benchmarks/run.py ablation        # repq, +TanQ, +MOSF rules, dopq at W3/A3, W4/A4, W6/A6
    python benchmarks/run.py softmax-error   # post-Softmax quantizer errors on real and power-law attention
    python benchmarks/run.py tanq-grid --bits 3 4   # does a wider TanQ search grid help? (mean over modules)
    python benchmarks/run.py stress          # outlier-stressed DeiT-Tiny: repq vs dopq vs each MOSF rule
    python benchmarks/run.py timing          # calibration wall time, repq vs dopq (median of repeats)
    python benchmarks/run.py recon --recon-calib-size 256 --recon-iters 100   # reconstruction, reduced CPU settings
    python benchmarks/run.py recon-unit --recon-calib-size 128 --recon-iters 60 --recon-batch-size 32   # settings, one unit
    python benchmarks/run.py deploy --widths 8/8 4/8 4/4 --threads 2   # ONNX exports on onnxruntime and OpenVINO vs FP32, peers
    python benchmarks/run.py softmax-forms --bits 4 --threads 2 --repeats 15   # post-Softmax export forms, per op
    python benchmarks/run.py deploy-sensitivity --bits 8 4 --threads 2   # the same network computed four ways
    python benchmarks/run.py deploy-noise --models swin_tiny_patch4_window7_224 --deploy-methods recommended --threads 2   # the agreement floor
    python benchmarks/run.py openvino-profile --models swin_tiny_patch4_window7_224 --deploy-methods recommended --widths 8/8 --repeats 5 --threads 2   # OpenVINO per-layer time vs NNCF
    python benchmarks/run.py save-size --bits 8 4 3   # --save file sizes against the float checkpoints
    python benchmarks/run.py families --threads 1   # every supported timm family, random init, W4/A4
    python benchmarks/run.py data            # data loading: streamed vs model-only images/s, peak RSS (CLI)
    python benchmarks/run.py calib-gains --threads 2 --models deit_tiny_patch16_224 stress   # GPTQ / auto post-Softmax
    python benchmarks/run.py calib-gains --threads 2 --recipes dopq recommended repq --widths 8/8 4/8 4/4 3/3 \
        --seeds 0 1 2 --suffix _preset   # the recommended preset against dopq and repq, paired
    python benchmarks/run.py calib-gains --threads 2 --recipes dopq recommended --widths 4/4 3/3 --seeds 0 1 2 \
        --calib-size 16 --suffix _c16_preset   # the same with fewer calibration images (a stress case)
    python benchmarks/run.py error-budget --threads 2 --models deit_tiny_patch16_224 stress --widths 4/4 3/3 \
        --eval-subset 250   # what each kind of quantizer and each block costs (kept float in turn)
    python benchmarks/run.py large-models --threads 2   # ViT-B/16, ViT-L/16 W4/A4 on the CPU: peak RSS, time
    python benchmarks/run.py distributed --threads 1 --recon-calib-size 128 --recon-iters 20 --recon-batch-size 32
                                             # 1 process vs torchrun 2 gloo processes (DeiT-Tiny W3/A3)
    python benchmarks/run.py speed --device cuda --bits 4 3   # simulated-quantized vs FP images/s, calibration time
    python benchmarks/run.py hf-deit --threads 2 --bits 4 3   # the shared DeiT-Tiny as a transformers ViT vs timm
    python benchmarks/run.py render          # docs/RESULTS.md and docs/results-archive.md from the JSON files

Protocol everywhere: 32 calibration images from CIFAR-10 train (seed 0), the strided 1000 CIFAR-10 test
images, shared reference checkpoints from ../shared (override with --shared).
"""

from __future__ import annotations

import argparse
import copy
import importlib
import json
import logging
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from dopq.config import MAX_BITS, MIN_BITS, QuantConfig, ReconstructConfig, get_preset
from dopq.errors import DopqError
from dopq.experiment import RunSettings, Workload, environment, load_workload, run_recipe
from dopq.files import atomic_path
from dopq.stress import rescale_layernorm_channels

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"
MODELS = {
    "deit_tiny_patch16_224": "deit_tiny_patch16_224.cifar10.safetensors",
    "swin_tiny_patch4_window7_224": "swin_tiny_patch4_window7_224.cifar10.safetensors",
}


def workload(args: argparse.Namespace, arch: str, progress: bool = False) -> Workload:
    shared = Path(args.shared)
    settings = RunSettings(
        model=arch,
        checkpoint=str(shared / "models" / MODELS[arch]),
        data=str(shared / "data" / args.data_file),
        calib_size=32,
        seed=0,
        eval_subset=args.eval_subset,
        device=args.device,
        batch_size=args.batch_size,
    )
    # the evaluation images stream through the workload's loader (default workers, kept for every recipe)
    return load_workload(settings)


def one(work: Workload, config: QuantConfig, label: str, **kw: Any) -> dict[str, Any]:
    cuda = torch.device(work.settings.device).type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    result, _ = run_recipe(work, config, method=label, progress=False, **kw)
    keep = ("model", "method", "w_bits", "a_bits", "fp_top1", "quant_top1", "fp_top5", "quant_top5",
            "calib_seconds", "eval_images", "timings", "reconstruction",
            "fp_top1_correct", "quant_top1_correct")  # fmt: skip
    row = {k: result[k] for k in keep}
    row["recipe"] = config.to_dict()
    row["wall_seconds"] = time.perf_counter() - t0
    if cuda:  # the whole row: calibration, reconstruction and both evaluations
        row["peak_gpu_memory_mb"] = torch.cuda.max_memory_allocated() / 2**20
    print(f"  {work.settings.model} {label:24s} W{config.w_bits}A{config.a_bits} top1 {row['quant_top1']:.4f} "
          f"(fp {row['fp_top1']:.4f}) calib {row['calib_seconds']:.1f}s", flush=True)  # fmt: skip
    return row


_RESULTS_DIR = [RESULTS]


def save(name: str, payload: dict[str, Any]) -> None:
    out = _RESULTS_DIR[0]
    out.mkdir(parents=True, exist_ok=True)
    # the GPU's name when this process used CUDA, else the CPU's
    device = "cuda" if torch.cuda.is_available() and torch.cuda.is_initialized() else "cpu"
    payload = {**environment(device), **payload}
    with atomic_path(out / f"{name}.json") as tmp:
        tmp.write_text(json.dumps(payload, indent=2, default=str) + "\n")


def ablation_recipes(bits: int) -> dict[str, QuantConfig]:
    repq = get_preset("repq", w_bits=bits, a_bits=bits)
    dopq = get_preset("dopq", w_bits=bits, a_bits=bits)
    return {
        "repq": repq,
        "repq+tanq": repq.replace(softmax_quantizer="tanq"),
        "repq+mosf-median": repq.replace(ln_scale="median"),
        "repq+mosf-mad": repq.replace(ln_scale="mad"),
        "repq+mosf-search": repq.replace(ln_scale="search"),
        "repq+int-zp": repq.replace(integer_zero_point=True),
        "repq+exact-zp": repq.replace(integer_zero_point=True, ln_shift="input"),
        "repq+bias-corr": repq.replace(bias_correction=True),
        "dopq": dopq,
        "dopq-without-bias-corr": dopq.replace(bias_correction=False),
    }


def suite_foundation(args: argparse.Namespace) -> None:
    rows = []
    for arch in args.models:
        work = workload(args, arch)
        for bits in (4, 3):
            rows.append(one(work, get_preset("repq", w_bits=bits, a_bits=bits), "repq"))
            save("foundation", {"rows": rows})


def suite_ablation(args: argparse.Namespace) -> None:
    for arch in args.models:
        rows = []
        work = workload(args, arch)
        for bits in args.bits:
            for label, cfg in ablation_recipes(bits).items():
                if args.recipes and label not in args.recipes:
                    continue
                rows.append(one(work, cfg, label))
                save(
                    f"ablation_{arch.split('_')[0]}{args.suffix}", {"rows": rows}
                )  # after each row: partial runs count


def suite_stress(args: argparse.Namespace) -> None:
    rows = []
    arch = "deit_tiny_patch16_224"
    work = workload(args, arch)
    info = rescale_layernorm_channels(work.model, n_channels=4, factor_range=(10.0, 40.0), seed=0)
    work.fp_result = None  # the rescale keeps the function; FP is re-measured to show it
    rescale = {"channels_per_layernorm": 4, "factors": [10, 40], "layernorms": len(info)}
    for bits in args.bits:
        for label, cfg in ablation_recipes(bits).items():
            if args.recipes and label not in args.recipes:
                continue
            rows.append(one(work, cfg, label))
            save("stress", {"rows": rows, "rescale": rescale})  # after each row: partial runs count


def suite_timing(args: argparse.Namespace) -> None:
    """Calibration wall time of repq and dopq (W4/A4), the two alternated within every repeat so that
    load from anything else running falls on both alike; medians and their ratio."""
    from dopq.api import quantize_with_report

    work = workload(args, "deit_tiny_patch16_224")
    work.settings.fp_eval = False
    methods = ("repq", "dopq")
    times: dict[str, list[float]] = {method: [] for method in methods}
    for _ in range(args.repeats):
        for method in methods:
            model = copy.deepcopy(work.model)
            _, report = quantize_with_report(model, work.calib_images, get_preset(method), progress=False)
            times[method].append(report.calib_seconds)
    out: dict[str, Any] = {}
    for method in methods:
        out[method] = {"calib_seconds": times[method], "median": statistics.median(times[method])}
        print(f"  {method}: calib {times[method]}", flush=True)
    out["dopq_over_repq"] = out["dopq"]["median"] / out["repq"]["median"]
    save(f"timing_{torch.get_num_threads()}threads", out)


def suite_recon(args: argparse.Namespace) -> None:
    rows = []
    for arch in args.models:
        work = workload(args, arch)
        for bits in args.bits:
            base = get_preset("dopq", w_bits=bits, a_bits=bits)
            rows.append(one(work, base, "dopq"))
            rcfg = ReconstructConfig(
                calib_size=args.recon_calib_size,
                iters=args.recon_iters,
                batch_size=args.recon_batch_size,
                drop_prob=args.recon_drop_prob,
            )
            rows.append(
                one(work, base.replace(reconstruct=rcfg), "dopq+recon", recon_size=args.recon_calib_size)
            )
            save(
                args.recon_name, {"rows": rows, "settings": vars(args)}
            )  # after each row: partial runs count


# (label, ReconstructConfig overrides): from BRECQ/QDrop's fixed rates to this library's defaults;
# "iters" overrides the schedule length of a row
RECON_UNIT_VARIANTS: list[tuple[str, dict[str, Any]]] = [
    ("AdaRound, fixed lr: weight 1e-3, act 4e-5; no bias",
     dict(rounding="adaround", lr_weight=1e-3, lr_act=4e-5, learn_bias=False)),
    ("AdaRound, weight 2/iters, act 4e-5; no bias",
     dict(rounding="adaround", lr_weight="2/iters", lr_act=4e-5, learn_bias=False)),
    ("+ act 0.6/iters", dict(rounding="adaround", lr_weight="2/iters", learn_bias=False)),
    ("+ bias learned", dict(rounding="adaround", lr_weight="2/iters")),
    ("+ weight 6/iters", dict(rounding="adaround")),
    ("+ straight-through rounding (default)", {}),
    ("default + weight scales learned", dict(learn_weight_scale=True, lr_weight_scale=1e-2)),
    ("default, QDrop 0.25", dict(drop_prob=0.25)),
    ("default, no QDrop", dict(drop_prob=0.0)),
    ("300 iters, AdaRound", dict(iters=300, rounding="adaround")),
    ("300 iters, straight-through", dict(iters=300, rounding="ste")),
]  # fmt: skip


def suite_recon_unit(args: argparse.Namespace) -> None:
    """Reconstruction settings on one DeiT-Tiny unit (W3/A3, short CPU schedule): block loss on the
    training images and on held-out images (the last quarter of the reconstruction set)."""
    from dopq.api import quantize
    from dopq.reconstruct import block_loss, reconstruct_unit
    from dopq.unit_io import cache_unit_io

    work = workload(args, "deit_tiny_patch16_224")
    fp = copy.deepcopy(work.model)
    q = quantize(
        copy.deepcopy(work.model), work.calib_images, get_preset("dopq", w_bits=3, a_bits=3), progress=False
    )
    images = work.recon_images(args.recon_calib_size)
    unit_name = "blocks.1"
    inputs = cache_unit_io(q, q.get_submodule(unit_name), images, 64, output=False)
    targets = cache_unit_io(fp, fp.get_submodule(unit_name), images, 64, output=True)
    n_train = len(images) * 3 // 4
    with torch.no_grad():
        held_out_before = float(block_loss(q.get_submodule(unit_name)(inputs[n_train:]), targets[n_train:]))
    rows = []
    for label, overrides in RECON_UNIT_VARIANTS:
        iters = overrides.get("iters", args.recon_iters or 60)
        overrides = {k: (2.0 / iters if v == "2/iters" else v) for k, v in overrides.items() if k != "iters"}
        rcfg = ReconstructConfig(
            calib_size=n_train, iters=iters, batch_size=args.recon_batch_size, **overrides
        )
        unit = copy.deepcopy(q.get_submodule(unit_name))
        t0 = time.perf_counter()
        res = reconstruct_unit(unit, inputs[:n_train], targets[:n_train], rcfg, iters,
                               torch.Generator().manual_seed(0), progress=False)  # fmt: skip
        with torch.no_grad():
            held_out = float(block_loss(unit(inputs[n_train:]), targets[n_train:]))
        rows.append({"variant": label, "unit": unit_name, "iters": iters, "train_images": n_train,
                     "held_out_images": len(images) - n_train, "batch_size": rcfg.batch_size,
                     "rounding": rcfg.rounding,
                     "lr_weight": rcfg.lr_weight_for(iters), "lr_act": rcfg.lr_act_for(iters),
                     "lr_bias": rcfg.lr_bias_for(iters) if rcfg.learn_bias else None,
                     "seconds": time.perf_counter() - t0, **res,
                     "held_out_before": held_out_before, "held_out_after": held_out})  # fmt: skip
        print(f"  {label}: train {res['loss_after']:.0f}, held out {held_out:.0f}", flush=True)
        save("recon_unit", {"rows": rows, "settings": vars(args)})


_SUITES_ELSEWHERE = {
    "softmax-error": "softmax_error",
    "tanq-grid": "softmax_error",
    "deploy": "deploy",
    "deploy-sensitivity": "deploy",
    "deploy-noise": "deploy",
    "deploy-float64": "deploy",
    "save-size": "deploy",
    "openvino-profile": "openvino_profile",
    "families": "families",
    "data": "data_bench",
    "calib-gains": "calib_gains",
    "calib-gains-timing": "calib_gains",
    "error-budget": "error_budget",
    "large-models": "scale",
    "distributed": "scale",
    "speed": "speed",
    "softmax-forms": "softmax_forms",
    "hf-deit": "hf_deit",
}
_OWN_SUITES = ("foundation", "ablation", "stress", "timing", "recon", "recon-unit")


# suites that take the outlier-stressed DeiT-Tiny as a model name beside the shared architectures
_STRESS_SUITES = ("calib-gains", "error-budget")


def _count(least: int) -> Any:
    """An argparse type: an integer of at least ``least`` (0 or 1); a bad one is a usage error, not a
    traceback from deep inside a suite."""

    def parse(text: str) -> int:
        value = int(text)
        if value < least:
            raise ValueError(text)
        return value

    parse.__name__ = "non-negative integer" if least == 0 else "positive integer"
    return parse


def _width_spec(text: str) -> str:
    """An argparse type: ``W/A`` bit widths, each in MIN_BITS..MAX_BITS (kept as written: the suites parse it)."""
    w, sep, a = text.partition("/")
    if not (sep and all(x.isdigit() and MIN_BITS <= int(x) <= MAX_BITS for x in (w, a))):
        raise argparse.ArgumentTypeError(
            f"expected W/A with each in {MIN_BITS}..{MAX_BITS}, e.g. 4/8, got {text!r}"
        )
    return text


def recipe_labels(suite: str) -> list[str] | None:
    """The names ``--recipes`` picks from in ``suite`` (None: a suite that takes presets by name)."""
    if suite in ("ablation", "stress"):
        return list(ablation_recipes(4))
    if suite in ("calib-gains", "calib-gains-timing"):
        from calib_gains import calib_gain_recipes

        return list(calib_gain_recipes(4, 4))
    return None


def _check_recipes(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """A misspelt ``--recipes`` name matched nothing: the suite ran no recipe and exited 0."""
    known = recipe_labels(args.suite) if args.recipes else None
    if known is None:
        return
    unknown = [name for name in args.recipes if name not in known]
    if unknown:
        p.error(f"--recipes {' '.join(unknown)}: not a {args.suite} recipe; choose from {', '.join(known)}")
    if args.suite == "calib-gains-timing" and "dopq" not in args.recipes:
        p.error("calib-gains-timing measures every recipe against dopq: add dopq to --recipes")


def _check_models(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """``stress`` is a model of the suites that build it; elsewhere it failed with a KeyError."""
    if "stress" in args.models and args.suite not in _STRESS_SUITES:
        p.error(f"--models stress: only {' and '.join(_STRESS_SUITES)} build the outlier-stressed model; "
                f"choose from {', '.join(MODELS)}")  # fmt: skip


def parse_arguments(argv: list[str] | None = None) -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    """The parser and ``argv`` parsed and checked (a bad argument exits with status 2 and one line):
    what a recorded command is checked against."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "suite",
        choices=[*_OWN_SUITES, *_SUITES_ELSEWHERE, "render"],
    )
    p.add_argument("--shared", default=str(ROOT.parent.parent / "shared"))
    p.add_argument("--data-file", default="cifar10-jpeg.tar.gz", help="archive under <shared>/data")
    p.add_argument(
        "--models", nargs="+", default=list(MODELS), choices=[*MODELS, "stress"], metavar="MODEL",
        help=f"{', '.join(MODELS)}; stress: the outlier-stressed DeiT-Tiny (calib-gains, error-budget)",
    )  # fmt: skip
    p.add_argument(
        "--bits",
        nargs="+",
        type=int,
        default=[3, 4, 6],
        choices=range(MIN_BITS, MAX_BITS + 1),
        metavar="BITS",
    )
    p.add_argument("--eval-subset", type=_count(1), default=1000)
    p.add_argument("--batch-size", type=_count(1), default=100)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=_count(0), default=0, help="torch intra-op threads (0: torch's default)")
    p.add_argument("--repeats", type=_count(1), default=3)
    p.add_argument(
        "--recipes",
        nargs="+",
        help="only these recipes (ablation, stress, calib-gains, calib-gains-timing; default: all)",
    )
    p.add_argument(
        "--suffix",
        default="",
        help="result name suffix (ablation, calib-gains, speed), e.g. _eval5000 for another protocol",
    )
    p.add_argument("--recon-calib-size", type=_count(1), default=1024)
    p.add_argument("--recon-iters", type=_count(1))
    p.add_argument("--recon-batch-size", type=_count(1), default=64)
    p.add_argument("--recon-drop-prob", type=float, help="QDrop probability (default: the library's rule)")
    p.add_argument(
        "--recon-grad-shards",
        type=_count(1),
        default=2,
        help="distributed: gradient shards of the sharded runs",
    )
    p.add_argument("--recon-name", default="recon_cpu")
    p.add_argument("--speed-batch", type=_count(1), default=256, help="speed: images per forward")
    p.add_argument("--speed-compile", action="store_true", help="speed: also through torch.compile")
    p.add_argument("--speed-profile", action="store_true", help="speed: profile one eager dopq batch")
    p.add_argument("--results-dir", type=Path, help="where the JSON goes (default benchmarks/results)")
    p.add_argument(
        "--data-parts", nargs="+", choices=["throughput", "memory"], default=["throughput", "memory"]
    )
    p.add_argument("--data-tmp", type=Path, help="data: generated folders (default $TMPDIR/dopq-data-bench)")
    p.add_argument(
        "--widths",
        nargs="+",
        type=_width_spec,
        help="deploy, calib-gains: W/A widths, e.g. 4/8 (deploy: 8/8 4/8 4/4; calib-gains: --bits)",
    )
    p.add_argument(
        "--calib-size",
        type=_count(1),
        default=32,
        help="calib-gains: calibration images per seed (default 32, the RepQ-ViT protocol); fewer is a stress case",
    )
    p.add_argument(
        "--seeds",
        nargs="+",
        type=int,
        help="calib-gains: calibration seeds (default: 0); deploy-noise: noise seeds (default: 0 1 2 3)",
    )
    p.add_argument(
        "--deploy-parts", nargs="+", choices=["accuracy", "timing"], default=["accuracy", "timing"]
    )
    p.add_argument(
        "--deploy-methods",
        nargs="+",
        default=["dopq"],
        help="deploy: presets (or calib-gains variants: recommended+gptq) exported at each width",
    )
    p.add_argument(
        "--deploy-weight-types",
        nargs="*",
        default=[],
        choices=["uint8"],
        help="deploy: W8 also exported with these 8-bit weight containers (onnxruntime rows)",
    )
    p.add_argument(
        "--no-deploy-peers",
        dest="deploy_peers",
        action="store_false",
        help="deploy: skip quantize_static and NNCF",
    )
    p.add_argument(
        "--thread-check", type=int, default=200, help="deploy-float64: images run on another thread count too"
    )
    p.add_argument(
        "--float64-parts", nargs="+", choices=["accuracy", "timing"], default=["accuracy", "timing"]
    )
    p.add_argument(
        "--hf-folder", type=Path, help="hf-deit: where the transformers folder goes (default: a temp dir)"
    )
    p.add_argument(
        "--hf-skip-fp", action="store_true", help="hf-deit: skip the float timm vs transformers pass"
    )
    args = p.parse_args(argv)
    _check_recipes(p, args)
    _check_models(p, args)
    return p, args


def main(argv: list[str] | None = None) -> None:
    p, args = parse_arguments(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("dopq.reconstruct").setLevel(logging.INFO)  # one line per reconstructed unit
    if args.results_dir:
        _RESULTS_DIR[0] = args.results_dir
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        if args.suite in _SUITES_ELSEWHERE:  # suites in their own modules, called with the shared helpers
            module = importlib.import_module(_SUITES_ELSEWHERE[args.suite])
            getattr(module, f"suite_{args.suite.replace('-', '_')}")(args, workload, save)
        elif args.suite == "render":
            from render import render

            render(RESULTS, ROOT.parent / "docs" / "RESULTS.md")
        else:
            globals()[f"suite_{args.suite.replace('-', '_')}"](args)
    except DopqError as exc:
        # bad input (a data path, a recipe option): one line, as the dopq command prints it
        p.exit(2, f"{p.prog}: error: {exc}\n")
    except ValueError as exc:
        if args.suite != "render":
            raise
        # a render refusal (a result file without a table, two equal headings) is one line too
        p.exit(2, f"{p.prog}: error: {exc}\n")


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
