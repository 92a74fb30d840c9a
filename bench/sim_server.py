"""A simulated continuous-batching LLM server (vLLM-like) that meters how well a client keeps it busy.

    python -m bench.sim_server --port 8300            # prints SIM_URL=http://127.0.0.1:8300/v1 when ready

Speaks the OpenAI-compatible routes the openai_compat backend and the peers use: GET /v1/models,
POST /v1/completions (a prompt, a list of prompts, or `prompt_embeds`; `logprobs`, `logprob_token_ids`),
POST /v1/chat/completions (`n`, `seed`), POST /tokenize, POST /detokenize, GET /metrics (vLLM's queue gauges);
and GET /sim/stats, POST /sim/reset for the benchmark.

The engine, in simulated GPU time (really slept, so wall clocks mean something):
  * Sequences wait in a queue; each step admits waiting ones (first come, first served) while fewer than
    `max_num_seqs` run and their prompt tokens fit the step's `max_batched_tokens` budget (always at least one).
  * A step costs `step_s + token_s * tokens`, tokens = prompt tokens prefilled in the step + one per sequence
    decoding. A sequence's prefill step yields its first token; a scoring request (`max_tokens=1`) ends there,
    a generation runs one step per further token.
  * Lower bound of the work received: every token must be processed (`token_s * T`) and every step pays
    `step_s`, with at most `max_batched_tokens` tokens and `max_num_seqs` sequences a step:
    `bound = token_s * T + step_s * max(T / max_batched_tokens, S / max_num_seqs)`, S = sequence-steps.
    `efficiency = bound / wall` for a client's wall time: 1.0 only if the server never idles or runs part-full.

Answers are deterministic functions of the prompt (hashes), cheap to compute, so the server's own CPU is small.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import hashlib
import io
import json
import os
import random
import re
import time
import zlib
from dataclasses import dataclass

from aiohttp import web

MODEL = "sim-model"
VOCAB = 4096
_WORD_RE = re.compile(r"\s*\w+|\s*[^\w\s]|\s+")
WORDS = (
    "think step by step carefully answer the question read text classify label decide relation premise "
    "hypothesis entail contradict neutral consider each option choose best correct final reason about input "
    "output precisely first then check again category topic company artist film school"
).split()


def _unit(*parts: object) -> float:
    digest = hashlib.blake2b("\x1f".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def tokens_of(text: str) -> list[str]:
    return _WORD_RE.findall(text)


def token_id(token: str) -> int:
    return 2 + zlib.crc32(token.encode()) % (VOCAB - 2)


@dataclass
class Sequence:
    prefill: int
    length: int  # tokens to produce (>= 1)
    done: asyncio.Future
    left: int = 0


class Engine:
    def __init__(self, max_num_seqs: int, max_batched_tokens: int, step_s: float, token_s: float) -> None:
        self.max_num_seqs = max_num_seqs
        self.max_batched_tokens = max_batched_tokens
        self.step_s = step_s
        self.token_s = token_s
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.running: list[Sequence] = []
        self._wake = asyncio.Event()
        self.reset()

    def reset(self) -> None:
        self.tokens = 0  # T: every prefilled and decoded token
        self.seq_steps = 0  # S: sequences present summed over steps
        self.sequences = 0
        self.requests = 0
        self.steps = 0
        self.busy_s = 0.0
        self.batch_sum = 0  # running sequences summed over steps (mean batch = batch_sum / steps)
        self.first_arrival: float | None = None
        self.last_finish: float | None = None
        self.timeline: list | None = [] if os.environ.get("SIM_TIMELINE") else None

    def submit(self, prefill: int, length: int) -> asyncio.Future:
        if self.first_arrival is None:
            self.first_arrival = time.monotonic()
        future = asyncio.get_running_loop().create_future()
        self.waiting.append(Sequence(max(1, prefill), max(1, length), future))
        self.sequences += 1
        self._wake.set()
        return future

    def bound_s(self) -> float:
        steps = max(self.tokens / self.max_batched_tokens, self.seq_steps / self.max_num_seqs)
        return self.token_s * self.tokens + self.step_s * steps

    async def run(self) -> None:
        while True:
            if not self.waiting and not self.running:
                self._wake.clear()
                await self._wake.wait()
                continue
            budget = self.max_batched_tokens - len(self.running)
            admitted: list[Sequence] = []
            while self.waiting and len(self.running) + len(admitted) < self.max_num_seqs:
                head = self.waiting[0]
                if head.prefill > budget and (admitted or self.running):
                    break
                self.waiting.popleft()
                budget -= head.prefill
                admitted.append(head)
            tokens = len(self.running) + sum(s.prefill for s in admitted)
            batch = len(self.running) + len(admitted)
            began = time.monotonic()
            await asyncio.sleep(self.step_s + self.token_s * tokens)
            self.busy_s += time.monotonic() - began
            if self.timeline is not None:
                self.timeline.append((round(began, 4), batch, tokens, len(self.waiting)))
            self.steps += 1
            self.tokens += tokens
            self.seq_steps += batch
            self.batch_sum += batch
            finished = []
            still = []
            for seq in self.running:
                seq.left -= 1
                (finished if seq.left <= 0 else still).append(seq)
            for seq in admitted:
                seq.left = seq.length - 1
                (finished if seq.left <= 0 else still).append(seq)
            self.running = still
            for seq in finished:
                if not seq.done.done():
                    seq.done.set_result(None)
            if finished:
                self.last_finish = time.monotonic()

    def stats(self) -> dict:
        span = (self.last_finish - self.first_arrival) if self.first_arrival and self.last_finish else 0.0
        bound = self.bound_s()
        return {
            "requests": self.requests,
            "sequences": self.sequences,
            "tokens": self.tokens,
            "seq_steps": self.seq_steps,
            "steps": self.steps,
            "mean_batch": round(self.batch_sum / self.steps, 1) if self.steps else 0.0,
            "busy_s": round(self.busy_s, 3),
            "span_s": round(span, 3),
            "bound_s": round(bound, 3),
            "efficiency_over_span": round(bound / span, 3) if span else None,
            "running": len(self.running),
            "waiting": len(self.waiting),
        }


class SimServer:
    def __init__(self, engine: Engine, *, hidden: int) -> None:
        self.engine = engine
        self.hidden = hidden

    def app(self) -> web.Application:
        app = web.Application(client_max_size=256 * 1024**2)
        app.router.add_get("/v1/models", self.models)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_post("/tokenize", self.tokenize)
        app.router.add_post("/detokenize", self.detokenize)
        app.router.add_get("/metrics", self.metrics)
        app.router.add_get("/sim/stats", self.stats)
        app.router.add_post("/sim/reset", self.reset)
        return app

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": MODEL, "object": "model", "max_model_len": 8192}]})

    async def metrics(self, request: web.Request) -> web.Response:
        e = self.engine
        text = (
            f'vllm:num_requests_running{{model_name="{MODEL}"}} {len(e.running)}\n'
            f'vllm:num_requests_waiting{{model_name="{MODEL}"}} {len(e.waiting)}\n'
        )
        return web.Response(text=text)

    async def stats(self, request: web.Request) -> web.Response:
        stats = self.engine.stats()
        if self.engine.timeline is not None:
            stats["timeline"] = self.engine.timeline
        return web.json_response(stats)

    async def reset(self, request: web.Request) -> web.Response:
        self.engine.reset()
        return web.json_response({"ok": True})

    async def tokenize(self, request: web.Request) -> web.Response:
        body = await request.json()
        text = body.get("prompt") or ""
        ids = [token_id(t) for t in tokens_of(text)]
        return web.json_response({"count": len(ids), "max_model_len": 8192, "tokens": ids})

    async def detokenize(self, request: web.Request) -> web.Response:
        body = await request.json()
        return web.json_response({"prompt": "".join(f" t{i}" for i in body.get("tokens") or [])})

    def _embeds_rows(self, item: str) -> tuple[int, str]:
        import torch

        raw = base64.b64decode(item)
        tensor = torch.load(io.BytesIO(raw), weights_only=True)
        return int(tensor.shape[0]), hashlib.blake2b(raw, digest_size=8).hexdigest()

    async def completions(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.engine.requests += 1
        if "prompt_embeds" in body:
            items = body["prompt_embeds"] if isinstance(body["prompt_embeds"], list) else [body["prompt_embeds"]]
            inputs = [self._embeds_rows(item) for item in items]
        else:
            prompts = body.get("prompt")
            prompts = prompts if isinstance(prompts, list) else [prompts]
            if not all(isinstance(p, str) for p in prompts):
                return web.json_response({"error": {"message": "prompt: strings only"}}, status=400)
            inputs = [(len(tokens_of(p)) + 1, p) for p in prompts]
        max_tokens = int(body.get("max_tokens") or 16)
        n = int(body.get("n") or 1)
        await asyncio.gather(*(self.engine.submit(size, max_tokens) for size, _ in inputs for _ in range(n)))
        k = body.get("logprobs")
        named = body.get("logprob_token_ids") or []
        as_ids = bool(body.get("return_tokens_as_token_ids"))
        choices = []
        for number, (_, key) in enumerate(inputs):
            for j in range(n):
                top = None
                if k is not None:
                    wanted = named or [token_id(w) for w in WORDS[: int(k)]]
                    top = {(f"token_id:{t}" if as_ids else f" t{t}"): -0.2 - 6.0 * _unit(key, t) for t in wanted}
                text = " " + random.Random(f"{key}|{j}").choice(WORDS)
                choices.append(
                    {
                        "index": number * n + j,
                        "text": text,
                        "logprobs": {"top_logprobs": [top]} if top is not None else None,
                        "finish_reason": "length",
                    }
                )
        prompt_tokens = sum(size for size, _ in inputs) * n
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": len(choices) * max_tokens}
        return web.json_response({"id": "cmpl-sim", "object": "text_completion", "model": MODEL, "choices": choices,
                                  "usage": usage})  # fmt: skip

    async def chat(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.engine.requests += 1
        messages = body.get("messages") or []
        rendered = "\n".join(str(m.get("content")) for m in messages)
        n = int(body.get("n") or 1)
        max_tokens = int(body.get("max_tokens") or 256)
        seed = body.get("seed")
        temperature = body.get("temperature", 1.0)  # OpenAI's and vLLM's default: sampling
        prefill = len(tokens_of(rendered)) + 8
        fields = _output_fields(rendered)
        texts = []
        for j in range(n):
            deterministic = seed is not None or temperature == 0
            rng = random.Random(f"{rendered}|{seed}|{temperature}|{j}" if deterministic else None)
            length = min(max_tokens, rng.randint(20, 60))
            text = " ".join(rng.choice(WORDS) for _ in range(length)).capitalize() + "."
            if "<prompt>" in rendered:  # promptolution's meta-prompts ask for the new prompt in these tags
                text = f"<prompt>{text}</prompt>"
            if fields:  # a structured-output client (DSPy's chat adapter): answer in its field markers
                text = "".join(f"[[ ## {f} ## ]]\n{text}\n\n" for f in fields) + "[[ ## completed ## ]]"
            texts.append(text)
        lengths = [min(max_tokens, len(t.split()) + 1) for t in texts]
        await asyncio.gather(*(self.engine.submit(prefill, length) for length in lengths))
        choices = [
            {"index": j, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
            for j, text in enumerate(texts)
        ]
        usage = {"prompt_tokens": prefill, "completion_tokens": sum(lengths)}
        return web.json_response({"id": "chat-sim", "object": "chat.completion", "model": MODEL, "choices": choices,
                                  "usage": usage})  # fmt: skip


def _output_fields(rendered: str) -> list[str]:
    """The output field names DSPy's chat adapter asks for (`Your output fields are: 1. `name` ...`)."""
    if "[[ ## " not in rendered or "Your output fields are:" not in rendered:
        return []
    section = rendered.split("Your output fields are:", 1)[1].split("All interactions", 1)[0]
    return re.findall(r"\d+\. `(\w+)`", section)


def write_embedding_weights(path: str, hidden: int, seed: int = 0) -> None:
    """A random (VOCAB, hidden) input-embedding matrix as safetensors: the 'served model's' weights for BBT."""
    import numpy as np
    from safetensors.numpy import save_file

    rng = np.random.default_rng(seed)
    save_file({"model.embed_tokens.weight": rng.normal(0, 0.02, (VOCAB, hidden)).astype(np.float32)}, path)


async def serve(args: argparse.Namespace) -> None:
    engine = Engine(args.max_num_seqs, args.max_batched_tokens, args.step_ms / 1000, args.token_us / 1e6)
    server = SimServer(engine, hidden=args.hidden)
    runner = web.AppRunner(server.app(), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", args.port, backlog=4096)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # noqa: SLF001
    print(f"SIM_URL=http://127.0.0.1:{port}/v1", flush=True)
    print(json.dumps(vars(args)), flush=True)
    await engine.run()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--max-batched-tokens", type=int, default=16384)
    parser.add_argument("--step-ms", type=float, default=8.0, help="fixed cost of one engine step")
    parser.add_argument("--token-us", type=float, default=20.0, help="cost of one token in a step (50k tokens/s)")
    parser.add_argument("--hidden", type=int, default=64, help="hidden size of prompt_embeds rows")
    args = parser.parse_args()
    asyncio.run(serve(args))


if __name__ == "__main__":
    main()
