"""The `local` backend: SmolLM2-135M-Instruct run by transformers on CPU.

- `backend`: `LocalBackend` (batching, label scoring, generation, extras for embedding-based methods);
- `prefixes`: forward passes with soft prompts (input and deep prefixes);
- `sampling`: per-row seeded sampling for generation;
- `attention`: the row-wise attention kernel (batch-independent numbers);
- `convert`: the GGUF -> safetensors cache;
- `dtype`: choice of fp32/bf16.
"""

from app.llm.local.attention import ROWWISE_ATTENTION, register_rowwise_attention, rowwise_attention
from app.llm.local.backend import CAPABILITIES, MAX_BATCH_TOKENS, LocalBackend
from app.llm.local.convert import DEFAULT_GGUF_NAME, convert_gguf, default_gguf_path
from app.llm.local.dtype import NATIVE_BF16_FLAGS, resolve_dtype

__all__ = [
    "CAPABILITIES",
    "DEFAULT_GGUF_NAME",
    "MAX_BATCH_TOKENS",
    "NATIVE_BF16_FLAGS",
    "ROWWISE_ATTENTION",
    "LocalBackend",
    "convert_gguf",
    "default_gguf_path",
    "register_rowwise_attention",
    "resolve_dtype",
    "rowwise_attention",
]
