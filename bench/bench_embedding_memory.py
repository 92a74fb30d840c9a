"""Resident memory of a process that embeds prompts for `prompt_embeds` (BBT over HTTP), reading the served model's
input embeddings two ways, side by side: the whole matrix as float32 (how the client did it before), and rows read
from the file in its dtype as prompts need them and widened to float32 (now; they were memory-mapped at first,
which left whatever the kernel mapped around each row resident). Each way runs in a fresh subprocess that opens
the weights, embeds 64 prompts of 200 tokens and computes the matrix's std (BBT's projection scale); reported: the
process's peak and final RSS growth over its start.

    python -m bench.bench_embedding_memory                    # SmolLM2 (the local model's converted weights) and a
                                                              # synthetic 152,064 x 3,584 bf16 file (a 7B-class model)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

PROBE = r"""
import json, sys
import numpy as np

def status_mb(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024

def rss_mb():
    return status_mb("VmRSS")

path, way = sys.argv[1], sys.argv[2]
start, start_anon = rss_mb(), status_mb("RssAnon")
if way == "whole":
    from safetensors import safe_open
    with safe_open(path, framework="pt") as handle:
        name = next(n for n in handle.keys() if n.endswith("embed_tokens.weight"))
        matrix = np.ascontiguousarray(handle.get_tensor(name).float().numpy())
    gather = lambda ids: matrix[ids]
    std = float(matrix.std())
else:
    from app.llm.embedding_weights import open_input_embeddings
    rows = open_input_embeddings(path)
    matrix = rows
    gather = lambda ids: rows[ids]
    std = rows.std()
rng = np.random.default_rng(0)
vocab = matrix.shape[0]
for _ in range(64):
    gather(rng.integers(0, vocab, 200))
peak = status_mb("VmHWM")  # not ru_maxrss: after fork + exec that can be the parent's at the fork
print(json.dumps({"start_mb": start, "start_anon_mb": start_anon, "peak_mb": peak, "final_mb": rss_mb(),
                  "anon_mb": status_mb("RssAnon"), "file_mb": status_mb("RssFile"), "std": std}))
"""


def synthetic_bf16(path: Path, vocab: int, hidden: int) -> None:
    """A safetensors file with one bf16 embedding tensor, written in slices (no full copy in memory)."""
    header = {
        "model.embed_tokens.weight": {
            "dtype": "BF16",
            "shape": [vocab, hidden],
            "data_offsets": [0, vocab * hidden * 2],
        }
    }
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    import numpy as np

    rng = np.random.default_rng(0)
    with path.open("wb") as out:
        out.write(len(raw).to_bytes(8, "little") + raw)
        for start in range(0, vocab, 8192):
            block = rng.standard_normal((min(8192, vocab - start), hidden), dtype=np.float32) * 0.02
            out.write((block.view(np.uint32) >> 16).astype(np.uint16).tobytes())


def measure(path: Path, way: str) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE, str(path), way], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--smollm2", type=Path, default=Path.home() / ".promptopt/models/smollm2-135m-instruct-q4_1/model.safetensors"
    )
    parser.add_argument("--vocab", type=int, default=152_064)
    parser.add_argument("--hidden", type=int, default=3_584)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        files = {}
        if args.smollm2.exists():
            files["SmolLM2-135M (float32 file)"] = args.smollm2
        synthetic = Path(tmp) / "synthetic.safetensors"
        synthetic_bf16(synthetic, args.vocab, args.hidden)
        files[f"synthetic {args.vocab} x {args.hidden} bf16"] = synthetic
        print("| weights | way | private (anon) RSS growth MB | file-backed RSS MB (page cache) | peak RSS growth MB |")
        print("|---|---|---|---|---|")
        for label, path in files.items():
            results = {way: measure(path, way) for way in ("whole", "read")}
            for way, r in results.items():
                name = "whole matrix as float32 (before)" if way == "whole" else "rows read on demand (now)"
                private = r["anon_mb"] - r["start_anon_mb"]
                print(f"| {label} | {name} | {private:.0f} | {r['file_mb']:.0f} | {r['peak_mb'] - r['start_mb']:.0f} |")
            ratio = (results["whole"]["anon_mb"] - results["whole"]["start_anon_mb"]) / max(
                1.0, results["read"]["anon_mb"] - results["read"]["start_anon_mb"]
            )
            print(f"| {label} | private growth, whole / read | {ratio:.0f}x | | |")


if __name__ == "__main__":
    main()
