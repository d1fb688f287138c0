#!/usr/bin/env python
"""How long compiling the shipped MNIST SiLU model's denoising step takes, with the compile cache empty and full.

For each protocol set, in a fresh cache directory: the step compiled by one session (JAX's lowering, SPU's compile,
the entry stored), then by a second session (its lowering, the entry read back), then run once for scale. The
executables must be the same bytes (the script checks it). Both sessions are in this process: a new process, or a
cluster party, compiling the same program reads the same entry (tests/test_compile_cache.py). Writes
docs/results/compile_cache.{md,json}.

    python scripts/compile_cache_times.py
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "checkpoints" / "mnist-ddpm-silu"


def measure(protocol_sets, model_dir: Path) -> dict:
    from cipherdm_spu import SecureSession, compile_cache
    from cipherdm_spu.benchmark import mnist_step_case

    case = mnist_step_case(model_dir, 1, 0)
    rows = {}
    for name in protocol_sets:
        with tempfile.TemporaryDirectory(prefix="cipherdm-compile-times-") as folder:
            os.environ[compile_cache.ENV] = str(Path(folder) / "executables")
            seconds, codes = [], []
            for _ in ("empty", "full"):
                with SecureSession(name) as session:
                    weights = session.share(case.weights)
                    started = time.perf_counter()
                    codes.append(session.compile(case.secure_fn, weights, *case.inputs).code)
                    seconds.append(time.perf_counter() - started)
                    if len(codes) == 2:
                        session.run(case.secure_fn, weights, *case.inputs)
                        step_seconds = session.last_stats.seconds
            if codes[0] != codes[1]:
                raise RuntimeError(f"{name}: the executable read back differs from the one compiled")
        rows[name] = {"empty_cache_s": seconds[0], "full_cache_s": seconds[1], "step_run_s": step_seconds,
                      "executable_bytes": len(codes[0])}
    return rows


def render(result: dict, command: str) -> str:
    from cipherdm_spu.results import markdown_table

    rows = [[f"`{name}`", f"{r['empty_cache_s']:.1f}", f"{r['full_cache_s']:.1f}",
             f"{r['empty_cache_s'] / r['full_cache_s']:.1f}x", f"{r['step_run_s']:.1f}",
             f"{r['executable_bytes'] / 1e6:.2f}"] for name, r in result["rows"].items()]
    return "\n".join([
        "# Compiling a denoising step: the compile cache empty and full", "",
        f"Command: `{command}`", "",
        f"Machine: {result['cpus']} CPUs, {result['machine']}. The shipped MNIST SiLU model's step (UNet and DDIM "
        "update, batch 1), compiled by a session in a fresh cache directory (JAX's lowering, SPU's compile, the entry "
        "stored), then by a second session (its lowering, the entry read back: the same executable bytes, checked), "
        "then run once by it (three parties in one process) for scale. Seconds of one run each.", "",
        *markdown_table(["set", "compile, empty cache s", "compile, full cache s", "empty / full", "one step's run s",
                         "executable MB"], rows, align="lrrrrr"),
        "",
        "What remains with a full cache is JAX's lowering of the program and its canonical HLO text "
        "(`cipherdm_spu/compile_cache.py`), which every compile does to find its entry.",
        "",
    ])


def main(argv=None) -> int:
    from cipherdm_spu.registry import available_protocol_sets
    from cipherdm_spu.results import write_report

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sets", nargs="+", default=["spu", "cipherdm"], choices=available_protocol_sets(),
                        help="protocol sets (default: spu cipherdm)")
    parser.add_argument("--model", type=Path, default=MODEL, help=f"a UNet2DModel directory (default: {MODEL})")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "results" / "compile_cache",
                        help="output path without extension (default: docs/results/compile_cache)")
    args = parser.parse_args(argv)
    result = {"cpus": os.cpu_count(), "machine": platform.processor() or platform.machine(),
              "rows": measure(args.sets, args.model)}
    argv_text = " ".join(argv if argv is not None else sys.argv[1:])
    command = f"python scripts/compile_cache_times.py {argv_text}".strip()
    result["command"] = command
    write_report(args.out, result, render(result, command))
    return 0


if __name__ == "__main__":
    sys.exit(main())
