"""The export table of docs/api.md: the shipped paper CapsNet (``CapsNet.from_pretrained("capsnet-mnist")``) on 4 MNIST
test digits, exported each way with default settings; per path the time to export (or compile) and to run, and the
largest absolute difference of each output (caps, lengths, recon) to eager. Prints a Markdown table.

    pip install 'capsdist[export]' onnxruntime && python scripts/export_table.py
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import onnxruntime
import torch
from onnx.reference import ReferenceEvaluator

from capsdist import CapsNet
from capsdist.data import mnist


def timed(fn: Callable[[], object], repeat: int = 1) -> tuple[object, float]:
    """fn's first result and the shortest of its wall times in seconds over ``repeat`` calls."""
    times, results = [], []
    for _ in range(repeat):
        start = time.perf_counter()
        results.append(fn())
        times.append(time.perf_counter() - start)
    return results[0], min(times)


def differences(eager: Sequence[torch.Tensor], got: Sequence[object]) -> str:
    """Max |got - eager| of each output, as "caps / lengths / recon"."""
    gaps = [(torch.as_tensor(np.asarray(b)) - a).abs().max().item() for a, b in zip(eager, got, strict=True)]
    return " / ".join(f"{gap:.1e}" for gap in gaps)


def main() -> None:
    """Export, run and compare each path; print the table."""
    model = CapsNet.from_pretrained("capsnet-mnist")
    images, _ = mnist.load(mnist.resolve_dir(), "test")
    x = torch.from_numpy(images[:4]).unsqueeze(1).float().div(255)
    rows, runs = [], 20  # a run's time: the best of 20 calls (a loaded machine only adds time)
    with torch.no_grad():
        eager, run_s = timed(lambda: model(x), runs)
        rows.append(("eager (reference)", "-", run_s, "0 / 0 / 0"))
        exported, export_s = timed(lambda: torch.export.export(model, (x,)).module())
        got, run_s = timed(lambda: exported(x), runs)
        rows.append(("torch.export.export", export_s, run_s, differences(eager, got)))
        onnx_file = Path(tempfile.mkdtemp()) / "capsnet.onnx"
        _, export_s = timed(lambda: torch.onnx.export(model, (x,), onnx_file, dynamo=True))
        session = onnxruntime.InferenceSession(str(onnx_file))
        got, run_s = timed(lambda: session.run(None, {"x": x.numpy()}), runs)
        rows.append(("torch.onnx.export(dynamo=True), onnxruntime", export_s, run_s, differences(eager, got)))
        got, run_s = timed(lambda: ReferenceEvaluator(str(onnx_file)).run(None, {"x": x.numpy()}))
        rows.append(("same .onnx, onnx.reference.ReferenceEvaluator", "-", run_s, differences(eager, got)))
        compiled = torch.compile(model)
        got, compile_s = timed(lambda: compiled(x))  # the first call compiles
        _, run_s = timed(lambda: compiled(x), runs)
        rows.append(("torch.compile (inductor)", compile_s, run_s, differences(eager, got)))
    print("| path | export/compile s | run s | max abs difference to eager (caps / lengths / recon) |")
    print("|---|---|---|---|")
    for path, prepare, run, diff in rows:
        prepare = prepare if isinstance(prepare, str) else f"{prepare:.1f}"
        print(f"| {path} | {prepare} | {run:.2f} | {diff} |")
    sizes = ", ".join(f"{p.name} {p.stat().st_size:,} bytes" for p in sorted(onnx_file.parent.iterdir()))
    print(f"\nwritten by torch.onnx.export: {sizes}; torch {torch.__version__}, onnxruntime {onnxruntime.__version__}")


if __name__ == "__main__":
    main()
