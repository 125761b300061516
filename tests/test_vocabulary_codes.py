"""Written codes (network/vocabulary.py, training/vocabulary_codes.py): MBC's codebook step on the
base LLM's own token table, in a token memory, on tiny models."""

from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import tiny_config
from torch import nn

from mbc.bank import BankLayout, MemoryBank
from mbc.data import documents
from mbc.data.generated import generate_examples
from mbc.errors import MBCError
from mbc.evaluation.online import EvalConfig, run_eval
from mbc.memory.ingest import ingest
from mbc.network.vocabulary import CodeWriter, VocabularyCodebook
from mbc.token_memory import TokenMemory, TokenMemoryConfig
from mbc.training.adapters import AdapterRun
from mbc.training.token_memory import train_token_memory
from mbc.training.vocabulary_codes import kept_inputs, train_codes, written_share

KEYS = dict(retrieval_top_k=1, retrieval_subspaces=4, retrieval_codes=4)


@pytest.fixture(scope="module")
def rows():
    return generate_examples(8, seed=3)


def _fitted(tiny_paths, rows, codes: str) -> TokenMemory:
    torch.manual_seed(0)
    config = TokenMemoryConfig(keep=12, layer=2, codes=codes, base=tiny_config(tiny_paths, **KEYS).to_dict())
    return train_token_memory(rows, config, before=1, steps=50)


@pytest.fixture(scope="module")
def trained(tiny_paths, rows):
    model = _fitted(tiny_paths, rows, "written")
    kept = kept_inputs(model, documents(rows))
    untrained = {k: v.clone() for k, v in model.state_dict().items()}
    losses = train_codes(model, rows[:8], 40, AdapterRun(learning_rate=2e-2, writer_learning_rate=2e-2), kept)
    return model, kept, untrained, losses


def test_the_codebook_finds_the_nearest_token_and_passes_gradients_straight_through():
    table = nn.Embedding(5, 3)
    with torch.no_grad():
        table.weight.copy_(torch.tensor([[0, 0, 0], [1, 0, 0], [0, 2, 0], [0, 0, 3], [1, 1, 1.0]]))
    codebook = VocabularyCodebook(table, beta=0.5, chunk=2)
    vectors = torch.tensor([[0.9, 0.1, 0.0], [0.1, 1.6, 0.2], [0.8, 0.9, 1.2]], requires_grad=True)
    quantized = codebook(vectors)
    assert quantized.ids.tolist() == [1, 2, 4]
    chosen = table.weight[[1, 2, 4]].detach()
    assert torch.allclose(quantized.embeddings.detach(), chosen)
    (quantized.embeddings.sum() + quantized.commitment).backward()
    # straight through: d(sum)/d(vector) = 1, plus the commitment's beta x 2 (vector - code) / 9
    assert torch.allclose(vectors.grad, 1 + 0.5 * 2 * (vectors.detach() - chosen) / 9)
    assert table.weight.grad is None  # the LLM's token table is read, never trained


def test_an_untrained_writer_names_the_kept_tokens_themselves(tiny_paths, rows):
    kept = _fitted(tiny_paths, rows, "kept")
    written = _fitted(tiny_paths, rows, "written")  # the same seed: the same scorer
    texts = documents(rows)
    assert np.array_equal(written.compress(texts), kept.compress(texts))
    writer = CodeWriter(4, 3)
    assert torch.equal(writer(torch.ones(2, 3), torch.randn(2, 4)), torch.ones(2, 3))


def test_training_moves_the_writer_and_the_kv_lora_lowers_the_loss_and_moves_codes(trained):
    model, kept, untrained, losses = trained
    moved = {k for k, v in model.state_dict().items() if not torch.equal(v, untrained[k])}
    assert "writer.rewrite.weight" in moved and any(".lora_B." in k for k in moved)
    assert all(k.startswith("writer.") or ".lora_" in k for k in moved)  # scorer, keys and LLM as they were
    assert np.mean(losses[-8:]) < np.mean(losses[:8]) - 0.1  # ~5.53 -> ~5.39 nats on the tiny LLM
    share = written_share(model, kept)
    assert 0 < share["moved"] <= 1 and 0 <= share["not_in_document"] <= share["moved"]


def test_written_codes_are_saved_read_back_and_refused_by_another_writers_bank(trained, rows, tmp_path):
    model, _, _, _ = trained
    model.save_pretrained(tmp_path / "written")
    loaded = TokenMemory.from_pretrained(tmp_path / "written")
    assert loaded.config.codes == "written" and loaded.config.trained_reader
    texts = documents(rows)
    assert np.array_equal(loaded.compress(texts), model.compress(texts))
    with MemoryBank.open(tmp_path / "bank.db", BankLayout.of(model)) as bank:
        ingest(model, bank, texts)
    other = TokenMemory(model.config, model.llm, model.retrieval_keys)  # the same scorer and keys, an untrained writer
    other.scorer = model.scorer
    with pytest.raises(MBCError):
        MemoryBank.open(tmp_path / "bank.db", BankLayout.of(other))


def test_eval_reads_written_codes_by_id_beside_their_unrelated_control(trained, rows, tmp_path):
    model, _, _, _ = trained
    unrelated = documents(generate_examples(8, seed=4))
    config = EvalConfig(batch_size=8, methods=["tokens", "tokens, unrelated bank"])
    summary = run_eval(None, rows[:30], unrelated, tmp_path, config, tokens=model)
    assert set(summary["methods"]) == {"tokens", "tokens, unrelated bank"}
    codes = model.codec.decode(model.compress(documents(rows)[:1]))[0]
    before, after = model.prompt_around(rows[0].question)
    assert model.prompt_ids(codes, rows[0].question) == before + codes + after


def test_written_codes_need_a_writer_and_a_valid_setting(tiny_paths, rows):
    with pytest.raises(MBCError, match="codes must be one of"):
        TokenMemoryConfig(codes="learned", base=tiny_config(tiny_paths, **KEYS).to_dict())
    kept = _fitted(tiny_paths, rows, "kept")
    with pytest.raises(MBCError, match="codes='written'"):
        train_codes(kept, rows[:8], steps=1)
    assert replace(kept.config, codes="written").codes == "written"
