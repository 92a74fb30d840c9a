"""The real local model behind the fake vLLM server: a `FakeVLLM` responder that answers scoring completions
(text `prompt` or `prompt_embeds`), `/tokenize` and `/v1/models` the way vLLM serving SmolLM2 would.

It exists to test the openai_compat backend's soft-prompt path end to end: what the client sends as
`prompt_embeds` (its own embedding of the text, plus the soft prompt) must make the served model answer what
the local runner answers for the same soft prompt. Only one-token completions (label scoring) are served.

    backend = LocalBackend("served", BackendSettings(kind="local"), cache_dir)
    responder = ServedModel(backend)                 # loads the model (once, synchronously)
    with FakeVLLMServer(responder=responder) as server:
        ...                                          # point an openai_compat backend at server.base_url,
                                                     # with embedding_weights=str(responder.weights_dir)
"""

from __future__ import annotations

import base64
import io
from typing import Any

from fastapi.responses import JSONResponse

from app.llm.local import LocalBackend

SERVED_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": "BadRequestError", "code": status}}, status)


class ServedModel:
    """Responder for `FakeVLLM(responder=...)`; `prompt_embeds=False` answers them as vLLM without the flag."""

    def __init__(self, backend: LocalBackend, *, prompt_embeds: bool = True) -> None:
        if not backend.started:
            backend._load_sync()  # noqa: SLF001 - the fake drives the model directly, on the server's thread
        self.backend = backend
        self.prompt_embeds = prompt_embeds
        self.tokenizer = backend.tokenizer()

    @property
    def weights_dir(self):
        return self.backend.model_dir

    def __call__(self, kind: str, body: dict) -> Any:
        if kind == "models":
            return {"object": "list", "data": [{"id": SERVED_MODEL, "object": "model", "max_model_len": 8192}]}
        if kind == "tokenize":
            ids = self.tokenizer(body["prompt"], add_special_tokens=body.get("add_special_tokens", True)).input_ids
            return {"count": len(ids), "max_model_len": 8192, "tokens": ids}
        if kind == "detokenize":
            return {"prompt": self.tokenizer.decode(body["tokens"])}
        if kind == "completions":
            return self._complete(body)
        return _error(400, f"{kind}: not served by this fake")

    def _complete(self, body: dict) -> Any:
        if body.get("max_tokens") != 1 or body.get("logprobs") is None:
            return _error(400, "this fake serves one-token scoring completions with logprobs only")
        if "prompt_embeds" in body:
            if not self.prompt_embeds:
                return _error(400, "You must set `--enable-prompt-embeds` to input `prompt_embeds`.")
            inputs = body["prompt_embeds"] if isinstance(body["prompt_embeds"], list) else [body["prompt_embeds"]]
            embedded = True
        else:
            inputs = body["prompt"] if isinstance(body["prompt"], list) else [body["prompt"]]
            embedded = False
        choices, prompt_tokens = [], 0
        for index, item in enumerate(inputs):
            answer = self._score_one(body, item, embedded)
            if not isinstance(answer, tuple):
                return answer  # an error
            choice, n = answer
            choices.append({**choice, "index": index})
            prompt_tokens += n
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": len(inputs),
            "total_tokens": prompt_tokens + len(inputs),
        }
        return {
            "id": "cmpl-served",
            "object": "text_completion",
            "model": SERVED_MODEL,
            "choices": choices,
            "usage": usage,
        }

    def _score_one(self, body: dict, item: str, embedded: bool) -> Any:
        """(choice, prompt tokens) for one prompt (text, or base64 prompt_embeds); an error response otherwise."""
        import torch

        backend = self.backend
        with torch.inference_mode():
            if embedded:
                embeds = torch.load(io.BytesIO(base64.b64decode(item)), weights_only=True)
                if embeds.ndim != 2 or embeds.shape[1] != backend.info.geometry["hidden_size"]:
                    return _error(400, f"prompt_embeds of shape {tuple(embeds.shape)} do not fit the model")
                n = embeds.shape[0]
                dtype = backend._model.get_input_embeddings().weight.dtype  # noqa: SLF001
                mask = torch.ones((1, n), dtype=torch.long)
                positions = torch.arange(n)[None]
                logits, _ = backend._forward(None, mask, positions, inputs_embeds=embeds.to(dtype)[None])  # noqa: SLF001
            else:
                ids = self.tokenizer(item).input_ids or [backend._pad_id]  # noqa: SLF001
                n = len(ids)
                logits, _ = backend._forward(*backend._left_pad([ids]))  # noqa: SLF001
            logprobs = torch.log_softmax(logits[0].float(), dim=-1)
        as_ids = bool(body.get("return_tokens_as_token_ids"))

        def key(token_id: int) -> str:
            return f"token_id:{token_id}" if as_ids else self.tokenizer.decode([token_id])

        top_id = int(logprobs.argmax())
        named = body.get("logprob_token_ids") or []
        wanted = named or logprobs.topk(int(body["logprobs"])).indices.tolist()
        top = {key(top_id): float(logprobs[top_id])}
        top.update({key(int(t)): float(logprobs[int(t)]) for t in wanted})
        choice = {
            "text": self.tokenizer.decode([top_id]),
            "logprobs": {"tokens": [key(top_id)], "token_logprobs": [top[key(top_id)]], "top_logprobs": [top]},
            "finish_reason": "length",
        }
        return choice, n
