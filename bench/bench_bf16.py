"""Does bf16 keep accuracy on the local runner? fp32 against bf16 on builtin:dbpedia16 (all 224 examples) with
the manual prompt, and behind random BBT soft prompts (input layer) and BBTv2 prefixes (every layer) drawn the
way the optimizers draw them.

  python -m bench.bench_bf16 [--soft 3] [--batch 16]

Per prompt and dtype: accuracy, examples/s; between the dtypes: the share of examples whose predicted label
agrees, and the largest |log-prob difference| of any verbalizer.
"""

from __future__ import annotations

import argparse
import asyncio
import time

import numpy as np

from app.datasets.service import builtin_task
from app.llm.local import LocalBackend
from app.llm.port import ContinuousPrefix, LabelScoreRequest, PrefixKind
from app.optimizers.bbt.projection import input_projection, layer_vectors, project, projection_std
from app.settings import BackendSettings, Settings

TEMPLATE = "{prompt}\nText: {input}\nTopic:"
MANUAL = "Classify the text."


async def score(backend: LocalBackend, requests: list[LabelScoreRequest]) -> tuple[np.ndarray, float]:
    started = time.perf_counter()
    results = await backend.label_logprobs(requests)
    return np.array([r.logprobs for r in results]), len(requests) / (time.perf_counter() - started)


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--soft", type=int, default=3, help="random soft prompts of each kind")
    parser.add_argument("--batch", type=int, default=16)
    args = parser.parse_args()

    task = builtin_task("builtin:dbpedia16")
    examples, labels = task.examples(), task.labels
    verbalizers = tuple(" " + label for label in labels)
    gold = np.array([labels.index(ex["target"]) for ex in examples])
    texts = [TEMPLATE.format(prompt=MANUAL, input=ex["input"]) for ex in examples]
    cache = Settings().model_cache_dir
    backends = {
        dtype: LocalBackend(dtype, BackendSettings(kind="local", dtype=dtype, batch_size=args.batch), cache)
        for dtype in ("float32", "bfloat16")
    }
    for backend in backends.values():
        await backend.start()
    reference = backends["float32"]
    geometry = reference.info.geometry
    rng = np.random.default_rng(0)

    prompts: list[tuple[str, ContinuousPrefix | None]] = [("manual prompt", None)]
    std = projection_std(1.0, await reference.embedding_std(), 50, 1.0)
    a = input_projection(0, 50, 5, geometry["hidden_size"], std)
    for i in range(args.soft):
        # z as CMA-ES first draws it: N(0, sigma^2 I), sigma 1 (BBT) / 0.2 (BBTv2), the presets' values.
        vectors = project(rng.standard_normal(50), a).reshape(5, -1)
        prompts.append((f"bbt soft prompt {i}", ContinuousPrefix.of(PrefixKind.INPUT, vectors)))
    kv = await reference.kv_statistics(texts[:16])
    for i in range(args.soft):
        layers = [
            layer_vectors(
                0, layer, 0.2 * rng.standard_normal(50), geometry, 5, projection_std(0.2, k, 50, 0.2),
                projection_std(0.2, v, 50, 0.2),
            )
            for layer, (k, v) in enumerate(kv)
        ]  # fmt: skip
        prompts.append((f"bbtv2 prefix {i}", ContinuousPrefix.of(PrefixKind.DEEP, np.stack(layers))))

    print(f"## fp32 vs bf16 on builtin:dbpedia16 ({len(examples)} examples), local SmolLM2-135M, batch {args.batch}")
    header = ("acc fp32", 10), ("acc bf16", 10), ("agree", 8), ("max |dlp|", 11), ("ex/s fp32", 11), ("ex/s bf16", 11)
    print(f"{'prompt':<20}" + "".join(f"{name:>{width}}" for name, width in header))
    agreements = []
    for name, prefix in prompts:
        requests = [LabelScoreRequest(t, verbalizers, prefix) for t in texts]
        lp32, rate32 = await score(backends["float32"], requests)
        lp16, rate16 = await score(backends["bfloat16"], requests)
        pred32, pred16 = lp32.argmax(1), lp16.argmax(1)
        agree = float((pred32 == pred16).mean())
        agreements.append(agree)
        print(
            f"{name:<20}{(pred32 == gold).mean():>10.3f}{(pred16 == gold).mean():>10.3f}{agree:>8.3f}"
            f"{np.abs(lp32 - lp16).max():>11.3f}{rate32:>11.1f}{rate16:>11.1f}",
            flush=True,
        )
    print(f"mean agreement of predicted labels: {np.mean(agreements):.3f}")
    for backend in backends.values():
        await backend.aclose()


if __name__ == "__main__":
    asyncio.run(main())
