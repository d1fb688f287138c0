#!/usr/bin/env python
"""SPU's matrix products with OpenMP limited to one thread (cipherdm_spu's default) and with OpenMP's default.

Each setting runs in its own child process (libgomp reads OMP_THREAD_LIMIT once, when SPU's library loads): secure
matmuls and the MNIST model's convolutions at its shapes, an elementwise product and a SiLU as controls (SPU's
elementwise ops do not use Eigen's threads), and, unless --quick, one denoising step of the shipped MNIST SiLU model
with `spu` and `cipherdm`. Times are the best of --repeat runs (the steps': the median) of three parties in one process;
bytes and send actions do not depend on the setting (the script checks it, to a run's variation). OpenMP's default is
taken as a limit of NO_LIMIT threads, more than any run here asks for, set explicitly so that cipherdm_spu keeps it
(cipherdm_spu/spu_threads.py); a limit of this machine's 2 CPUs would not do (measured: it already kept Eigen's products
at one thread, the three parties' threads counting against it). Writes docs/results/spu_threads.{md,json}.

    python scripts/benchmark_spu_threads.py
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: (M, K, N): (M x K) @ (K x N), both operands secret
MATMULS = [(49, 64, 64), (49, 576, 64), (784, 288, 32), (49, 2304, 64)]
#: (side, in channels, out channels, kernel): the MNIST UNet's convolutions, batch 1, 'same' padding
CONVOLUTIONS = [(28, 32, 32, 3), (14, 64, 64, 3), (7, 64, 64, 3), (28, 96, 32, 1)]
CONTROL_ELEMENTS = 28 * 28 * 64
STEP_SETS = ("spu", "cipherdm")
NO_LIMIT = 1024
CHILD_TIMEOUT_S = 3600


def measure(repeat: int, step: bool) -> dict:
    """In this process (whose OpenMP limit is already fixed): every case's best seconds, bytes and send actions."""
    import jax.numpy as jnp
    import numpy as np
    from jax import lax

    from cipherdm_spu import SecureSession, ops

    rng = np.random.default_rng(0)
    rows = {}

    def best(session, name, fn, *args):
        session.run(fn, *args)  # compiles
        seconds = []
        for _ in range(repeat):
            session.run(fn, *args)
            seconds.append(session.last_stats.seconds)
        stats = session.last_stats
        rows[name] = {"seconds": min(seconds), "bytes_sent": stats.bytes_sent, "send_actions": stats.send_actions}

    def conv(x, w):
        pad = (w.shape[0] - 1) // 2
        return lax.conv_general_dilated(x, w, (1, 1), ((pad, pad), (pad, pad)),
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))

    session = SecureSession("spu")
    secret = lambda *shape: session.share(rng.standard_normal(shape).astype(np.float32))  # noqa: E731
    for m, k, n in MATMULS:
        best(session, f"matmul ({m} x {k}) @ ({k} x {n})", jnp.dot, secret(m, k), secret(k, n))
    for side, cin, cout, kernel in CONVOLUTIONS:
        best(session, f"convolution {side}x{side}x{cin} -> {cout}, {kernel}x{kernel}", conv,
             secret(1, side, side, cin), secret(kernel, kernel, cin, cout))
    x = secret(CONTROL_ELEMENTS)
    best(session, f"control: product, {CONTROL_ELEMENTS} elements", lambda v: v * v, x)
    best(session, f"control: `spu` SiLU, {CONTROL_ELEMENTS} elements", ops.silu, x)
    session.close()
    if step:
        from cipherdm_spu.benchmark import measure_step, mnist_step_case

        case = mnist_step_case(ROOT / "checkpoints" / "mnist-ddpm-silu", 1, 0)
        for protocol in STEP_SETS:
            with SecureSession(protocol) as s:
                row = measure_step(s, case, repeat=repeat, breakdown=False)
            rows[f"MNIST SiLU step, `{protocol}`"] = {k: row[k] for k in ("seconds", "bytes_sent", "send_actions")}
    return rows


def run_child(limit: str, repeat: int, step: bool) -> dict:
    env = {**os.environ, "OMP_THREAD_LIMIT": limit}
    cmd = [sys.executable, __file__, "--child", "--repeat", str(repeat)] + ([] if step else ["--quick"])
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=CHILD_TIMEOUT_S)
    if out.returncode:
        raise RuntimeError(f"the child with OMP_THREAD_LIMIT={limit} failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def render(result: dict, command: str) -> str:
    from cipherdm_spu.results import markdown_table

    one, default = result["one_thread"], result["openmp_default"]
    rows = [[name, f"{default[name]['seconds']:.4f}", f"{one[name]['seconds']:.4f}",
             f"{default[name]['seconds'] / one[name]['seconds']:.1f}x", f"{one[name]['bytes_sent'] / 1e6:.2f}",
             str(one[name]["send_actions"])] for name in one]
    return "\n".join([
        "# SPU's matrix products: one OpenMP thread against OpenMP's default", "",
        f"Command: `{command}`", "",
        f"Machine: {result['cpus']} CPUs; three parties in one process (ABY3, FM64). OpenMP's default is measured "
        f"as OMP_THREAD_LIMIT={NO_LIMIT} (no limit in effect); cipherdm_spu's default is 1 "
        "(cipherdm_spu/spu_threads.py). Best of "
        f"{result['repeat']} runs; bytes and send actions are the same under both settings (checked: within 1 %, "
        "and send actions within 5 or 1 %, a run's variation).", "",
        *markdown_table(["case", "default s", "one thread s", "default / one thread", "MB sent", "send actions"], rows,
                        align="lrrrrr"),
        "",
    ])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=3, help="runs per case; the best is reported (default: 3)")
    parser.add_argument("--quick", action="store_true", help="skip the MNIST step rows")
    parser.add_argument("--out", default=str(ROOT / "docs" / "results" / "spu_threads"),
                        help="output path without extension (default: docs/results/spu_threads)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    if args.child:
        print(json.dumps(measure(args.repeat, not args.quick)))
        return 0
    cpus = os.cpu_count() or 1
    result = {"cpus": cpus, "repeat": args.repeat,
              "openmp_default": run_child(str(NO_LIMIT), args.repeat, not args.quick),
              "one_thread": run_child("1", args.repeat, not args.quick)}
    for name, row in result["one_thread"].items():
        other = result["openmp_default"][name]
        if abs(row["bytes_sent"] - other["bytes_sent"]) > 0.01 * other["bytes_sent"] \
                or abs(row["send_actions"] - other["send_actions"]) > max(5, 0.01 * other["send_actions"]):
            raise RuntimeError(f"{name}: the thread limit changed what was sent ({row} against {other})")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    command = "python scripts/benchmark_spu_threads.py" + (" --quick" if args.quick else "")
    out.with_suffix(".md").write_text(render(result, command))
    print(f"wrote {out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
