"""Exercise the CUDA measurement path on a machine with a GPU: every runtime and dtype that
applies, in process and isolated, and print what came back.

    python benchmarks/cuda_check.py [--device cuda:0] [--spec preset:mobilenet_v2@1]

Exit status 0 when every applicable combination measured (combinations a runtime does not
offer here, e.g. ONNX Runtime without its CUDA provider, are listed as skipped), 1
otherwise, 2 when there is no CUDA device.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda:0")
    ap.add_argument("--spec", default="preset:mobilenet_v2@1")
    ap.add_argument("--resolution", type=int, default=224)
    ap.add_argument("--batch", type=int, default=8)
    args = ap.parse_args(argv)

    import torch

    if not torch.cuda.is_available():
        print(f"no CUDA device (torch {torch.__version__}); nothing to check")
        return 2

    from blocks.load import load_spec
    from search.evaluators.fingerprint import device_fingerprint
    from search.evaluators.latency import measure_latency
    from search.evaluators.runner import evaluate
    from search.evaluators.types import EvalTask, MeasureSettings

    fp = device_fingerprint(args.device)
    print(f"device: {fp['gpu']}")
    print(f"torch {fp['torch']}, onnxruntime {fp['onnxruntime']}, CPU {fp['cpu_model']}")
    spec = load_spec(args.spec)
    try:
        import onnxruntime as ort

        ort_cuda = "CUDAExecutionProvider" in ort.get_available_providers()
    except ImportError:
        ort_cuda = False

    combos = [
        ("eager", "float32", False), ("eager", "float32", True), ("eager", "float16", False),
        ("eager", "float16", True), ("eager", "bfloat16", False),
        ("torchscript", "float32", False), ("torchscript", "float16", True),
        ("onnxruntime", "float32", False), ("onnxruntime", "float16", False),
    ]
    failures = 0
    header = (f"{'runtime':12s} {'dtype':9s} {'NHWC':5s} {'median ms':>10s} {'p90':>8s} "
              f"{'CV':>6s} {'n':>5s} {'ratio':>7s} {'timer':>24s}")
    print(header)
    print("-" * len(header))
    for runtime, dtype, nhwc in combos:
        if runtime == "onnxruntime" and not ort_cuda:
            print(f"{runtime:12s} {dtype:9s} {nhwc!s:5s} skipped: no CUDAExecutionProvider")
            continue
        settings = MeasureSettings(device=args.device, runtime=runtime, dtype=dtype,
                                   channels_last=nhwc, batch=args.batch,
                                   resolution=args.resolution, min_run_time_s=0.1, rounds=5)
        try:
            r = measure_latency(spec, settings)
        except Exception as exc:
            failures += 1
            print(f"{runtime:12s} {dtype:9s} {nhwc!s:5s} FAILED: {type(exc).__name__}: "
                  f"{str(exc).splitlines()[0] if str(exc) else ''}")
            continue
        s = r.latency_ms
        ratio = f"{r.ratio_to_reference.median:7.3f}" if r.ratio_to_reference else "-"
        print(f"{runtime:12s} {dtype:9s} {nhwc!s:5s} {s.median:10.3f} {s.p90:8.3f} "
              f"{100 * s.cv:5.1f}% {s.n:5d} {ratio:>7s} {r.device['timer']:>24s}")

    # the isolated path (child process, memory ceiling by resident-memory watchdog on CUDA)
    task = EvalTask(spec=spec.canonical_dict(),
                    measure=MeasureSettings(device=args.device, resolution=args.resolution,
                                            batch=args.batch, min_run_time_s=0.1, rounds=5),
                    timeout_s=300)
    out = evaluate(task)
    if out.ok:
        print(f"isolated eager float32: median {out.latency.latency_ms.median:.3f} ms, "
              f"ratio {out.latency.ratio_to_reference.median:.3f}, {out.seconds:.1f} s")
    else:
        failures += 1
        print(f"isolated eager float32 FAILED: {out.failure.reason}: {out.failure.message}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
