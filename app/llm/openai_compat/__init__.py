"""HTTP backend for vLLM or any other OpenAI-compatible server.

Modules: `transport` (aiohttp session, retries, the send gate), `probe` (capabilities at start-up), `backend`
(generation and label-scoring requests, batching and the in-flight limit), `embeds` (soft prompts as
`prompt_embeds`), `responses` (reading answers).
"""

from app.llm.openai_compat.backend import KIND, OpenAICompatBackend
from app.llm.openai_compat.transport import PROBE_HEADER, BackendHTTPError, parse_retry_after

__all__ = ["KIND", "PROBE_HEADER", "BackendHTTPError", "OpenAICompatBackend", "parse_retry_after"]
