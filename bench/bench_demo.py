"""The first run as a new user has it: `promptopt demo` in a fresh process with a fresh data directory (the GGUF
model converted again, nothing cached), timed from the command's start to its exit, repeated. Reports each run's
wall time, the job's own time and its held-out gain with the interval, then the median and range.

    python -m bench.bench_demo --runs 3                       # the default demo
    python -m bench.bench_demo --runs 1 --method plum         # another method's demo parameters
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GAIN = re.compile(
    r"held-out gain of the best prompt over the initial: ([+-][0-9.]+) "
    r"\(95% interval ([+-][0-9.]+) to ([+-][0-9.]+); p = ([0-9.e+-]+)"
)
JOB_TIME = re.compile(r"wall time\s+│?\s*([0-9.]+) s")


def run_once(method: str | None, seed: int) -> dict:
    with tempfile.TemporaryDirectory() as data_dir:
        env = {**os.environ, "PROMPTOPT_DATA_DIR": data_dir, "COLUMNS": "200"}
        command = [sys.executable, "-m", "promptopt", "demo", "--seed", str(seed)]
        if method:
            command += ["--method", method]
        started = time.monotonic()
        done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
        wall = time.monotonic() - started
    out = done.stdout
    gain, job = GAIN.search(out), JOB_TIME.search(out)
    if done.returncode != 0 or gain is None:
        print(out[-3000:], done.stderr[-3000:], file=sys.stderr)
        raise SystemExit(f"the demo failed (exit {done.returncode})")
    return {
        "wall_s": wall,
        "job_s": float(job.group(1)) if job else float("nan"),
        "gain": float(gain.group(1)),
        "low": float(gain.group(2)),
        "high": float(gain.group(3)),
        "p": float(gain.group(4)),
        "output": out,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--method", default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--show-output", action="store_true", help="print the last run's output")
    args = parser.parse_args()
    print(f"load before: {Path('/proc/loadavg').read_text().split()[:3]}")
    runs = []
    for index in range(args.runs):
        result = run_once(args.method, args.seed)
        runs.append(result)
        print(
            f"run {index + 1}: command {result['wall_s']:.1f} s, job {result['job_s']:.1f} s, held-out gain "
            f"{result['gain']:+.3f} [{result['low']:+.3f}, {result['high']:+.3f}] p={result['p']:.2g}; "
            f"load {Path('/proc/loadavg').read_text().split()[:3]}",
            flush=True,
        )
    walls = [r["wall_s"] for r in runs]
    print(f"command wall time: median {statistics.median(walls):.1f} s, range {min(walls):.1f}-{max(walls):.1f} s")
    if args.show_output:
        print(runs[-1]["output"])


if __name__ == "__main__":
    main()
