"""`prompt_embeds` are written without torch, in the bytes torch.save writes (its legacy format) and torch.load
reads back with `weights_only=True`, as vLLM does."""

from __future__ import annotations

import base64
import io
import pickle
import pickletools
import subprocess
import sys

import numpy as np
import pytest
import torch

from app.llm.openai_compat.embeds import encode_tensor, torch_save_bytes


def torch_saved(array: np.ndarray) -> tuple[bytes, str]:
    """torch.save's bytes for the tensor, and the key it gave the storage (its address)."""
    buffer = io.BytesIO()
    torch.save(torch.from_numpy(array), buffer, _use_new_zipfile_serialization=False)
    data = buffer.getvalue()
    stream = io.BytesIO(data)
    for _ in range(3):  # magic number, protocol, sizes
        pickle.load(stream)
    for _ in pickletools.genops(stream):  # the tensor's pickle (it needs a persistent_load)
        pass
    (key,) = pickle.load(stream)
    return data, key


@pytest.mark.parametrize(
    "shape",
    [(1, 1), (3, 8), (7, 576), (300, 16), (21, 3584), (2, 70_000)],  # one-, two- and four-byte ints in the pickle
)
def test_the_bytes_are_torch_saves(shape):
    array = np.random.default_rng(sum(shape)).standard_normal(shape).astype(np.float32)
    expected, key = torch_saved(array)
    assert torch_save_bytes(array, key) == expected


def test_torch_load_reads_them_back_as_vllm_does():
    array = np.random.default_rng(0).standard_normal((5, 64)).astype(np.float32)
    for given in (array, array.astype(np.float64), np.asfortranarray(array), array[:, ::2]):
        loaded = torch.load(io.BytesIO(base64.b64decode(encode_tensor(given))), weights_only=True)
        assert loaded.dtype == torch.float32 and loaded.is_contiguous()
        assert np.array_equal(loaded.numpy(), np.ascontiguousarray(given, dtype=np.float32))
    with pytest.raises(ValueError, match="2-D"):
        torch_save_bytes(np.zeros(3, dtype=np.float32))


def test_encoding_imports_no_torch():
    code = (
        "import sys, numpy as np\n"
        "from app.llm.openai_compat.embeds import encode_tensor\n"
        "encode_tensor(np.zeros((2, 3), dtype=np.float32))\n"
        "print('torch' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
