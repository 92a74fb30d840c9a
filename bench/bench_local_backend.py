"""Throughput of the `local` backend (SmolLM2-135M-Instruct on CPU): label scoring and generation.

  python -m bench.bench_local_backend                       # fp32 + bf16, label batch 16/32, generation batch 8
  python -m bench.bench_local_backend --dtypes float32 --examples 128 --attn rowwise,sdpa
  python -m bench.bench_local_backend --prefixes none,input,deep --prefix-length 5 --no-generation   # BBT/BBTv2

Label prompts look like a topic-classification prompt (instruction + a 20-60 word text + "Topic:"); the
table gives their mean token count (`--words 3,8` gives ~35-token prompts). Generation: chat-templated
prompts, sampled at T=0.7 with seeds, `--gen-tokens` max new tokens; tok/s counts the generated tokens
(EOS included) over wall time, prefill included. `--prefixes` scores the same prompts behind continuous
prompts as BBT (input layer) and BBTv2 (every layer) send them: 8 distinct random prefixes, as from one
CMA-ES generation.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import time
from pathlib import Path

import numpy as np

from app.llm.local import LocalBackend
from app.llm.port import ContinuousPrefix, GenerationRequest, LabelScoreRequest, PrefixKind
from app.settings import BackendSettings

WORDS = (
    "the company was founded in and is headquartered near river school album released by band player "
    "football season village district railway station built century church species plant genus family "
    "film directed starring novel written author painter born died museum university college students "
    "mountain range lake island population census village municipality county state record label song"
).split()
LABELS = (" company", " school", " artist", " athlete", " politician", " transport", " building", " nature")
GEN_PROMPTS = [
    "Write a short poem about the sea.",
    "Give three tips for learning a new language.",
    "Explain what a prime number is.",
    "Describe your ideal weekend.",
    "Summarize the plot of a heist movie you invent.",
    "List some uses of a paperclip.",
    "What makes a good cup of tea?",
    "Tell me a fun fact about owls.",
]


def label_requests(n: int, words: tuple[int, int] = (20, 60), seed: int = 0) -> list[LabelScoreRequest]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(*words)))
        prompt = (
            "Classify the text into one of: company, school, artist, athlete, politician, transport, "
            f"building, nature.\nText: {text}\nTopic:"
        )
        out.append(LabelScoreRequest(prompt, LABELS))
    return out


def with_prefixes(requests: list[LabelScoreRequest], kind: str, length: int, geometry: dict) -> list:
    if kind == "none":
        return requests
    rng = np.random.default_rng(0)
    if kind == "input":
        shape = (length, geometry["hidden_size"])
    else:
        shape = (geometry["num_layers"], 2, geometry["num_kv_heads"], length, geometry["head_dim"])
    prefixes = [ContinuousPrefix.of(PrefixKind(kind), rng.normal(0, 0.1, shape)) for _ in range(8)]
    return [LabelScoreRequest(r.prompt, r.verbalizers, prefixes[i % 8]) for i, r in enumerate(requests)]


async def bench_labels(
    cache: Path, dtype: str, batch: int, attn: str, requests, prefix: str = "none", prefix_length: int = 5
) -> tuple[float, float]:
    backend = LocalBackend("bench", BackendSettings(batch_size=batch, dtype=dtype), cache, attn_implementation=attn)
    await backend.start()
    requests = with_prefixes(requests, prefix, prefix_length, backend.info.geometry)
    await backend.label_logprobs(requests[:batch])  # warm-up
    t = time.perf_counter()
    results = await backend.label_logprobs(requests)
    elapsed = time.perf_counter() - t
    await backend.aclose()
    mean_tokens = sum(r.prompt_tokens for r in results) / len(results)
    return len(requests) / elapsed, mean_tokens


async def bench_generation(cache: Path, dtype: str, batch: int, attn: str, max_tokens: int) -> tuple[float, int]:
    backend = LocalBackend("bench", BackendSettings(batch_size=batch, dtype=dtype), cache, attn_implementation=attn)
    await backend.start()
    requests = [
        GenerationRequest(GEN_PROMPTS[i % len(GEN_PROMPTS)], max_tokens=max_tokens, temperature=0.7, seed=i)
        for i in range(batch)
    ]
    await backend.generate([GenerationRequest("Hi", max_tokens=4)])  # warm-up
    t = time.perf_counter()
    results = await backend.generate(requests)
    elapsed = time.perf_counter() - t
    await backend.aclose()
    tokens = sum(g.completion_tokens for g in results)
    return tokens / elapsed, tokens


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--batch-sizes", default="16,32")
    parser.add_argument("--examples", type=int, default=64)
    parser.add_argument("--words", default="20,60", help="min,max words of the text in a label prompt")
    parser.add_argument("--gen-batch", type=int, default=8)
    parser.add_argument("--gen-tokens", type=int, default=64)
    parser.add_argument("--attn", default="rowwise", help="comma list of rowwise, sdpa, eager")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--prefixes", default="none", help="comma list of none, input (BBT), deep (BBTv2)")
    parser.add_argument("--prefix-length", type=int, default=5)
    parser.add_argument("--no-generation", action="store_true")
    args = parser.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    cache = Path(os.environ.get("PROMPTOPT_DATA_DIR", Path.home() / ".promptopt")) / "models"
    low, high = (int(w) for w in args.words.split(","))
    requests = label_requests(args.examples, (low, high))
    import torch

    print(f"torch threads: {torch.get_num_threads()}, CPU cores: {os.cpu_count()}")
    print(f"{'task':<28}{'dtype':<10}{'attn':<9}{'batch':>6}{'throughput':>16}{'note':>28}")
    for dtype in args.dtypes.split(","):
        for attn in args.attn.split(","):
            for prefix in args.prefixes.split(","):
                for batch in (int(b) for b in args.batch_sizes.split(",")):
                    rate, mean_tokens = await bench_labels(
                        cache, dtype, batch, attn, requests, prefix, args.prefix_length
                    )
                    note = f"{len(requests)} ex, {mean_tokens:.0f} tok/prompt"
                    task = "label scoring" + ("" if prefix == "none" else f" +{prefix} prefix")
                    print(f"{task:<28}{dtype:<10}{attn:<9}{batch:>6}{rate:>10.1f} ex/s{note:>28}", flush=True)
            if args.no_generation:
                continue
            rate, tokens = await bench_generation(cache, dtype, args.gen_batch, attn, args.gen_tokens)
            note = f"{tokens} tokens, <= {args.gen_tokens}/row"
            print(
                f"{'generation (T=0.7)':<26}{dtype:<10}{attn:<9}{args.gen_batch:>6}{rate:>9.1f} tok/s{note:>28}",
                flush=True,
            )


if __name__ == "__main__":
    asyncio.run(main())
