import numpy as np
import pytest
import torch
from conftest import DOCUMENTS, QUESTIONS

from mbc import MBCError
from mbc.bank import BankLayout, MemoryBank
from mbc.memory.ingest import ingest
from mbc.memory.readers import (
    CodeCountReader,
    FullReader,
    RetrievalReader,
    WindowedReader,
    answer_from_bank,
    reader_for,
)

MORE = [
    f"Document number {i} tells of the {w} harbour of Vell{i}." for i, w in enumerate("old new red far wide".split())
]


def trained_codes(model):
    """A few training steps so that the codebook holds real document vectors (not its tiny init)."""
    model.train()
    model(DOCUMENTS + MORE, QUESTIONS * 4, ["a", "b"] * 4)
    return model.eval()


def codebook_of(model, documents):
    """Set the (single-stage) codebook to these documents' stored vectors, one code each, so that
    each of them is stored as codes no other document has: a property the tests below need, built
    rather than hoped for from a tiny random model (whose codebook may give every document the
    same codes on some machine)."""
    vectors = model.amortize(documents).detach().reshape(-1, model.llm.layout.hidden_size)
    codebook = model.quantizer.stages[0].codebook
    assert len(vectors) <= len(codebook)
    codebook.data[: len(vectors)] = vectors
    return model


def open_bank(model, path):
    return MemoryBank.open(path, BankLayout.of(model))


def test_code_counts_give_the_same_modulation_as_the_whole_bank(tiny_model, tmp_path):
    # 2 stages of 4 codes: 16 code tuples for 44 stored vectors, so some must repeat (what counts are for).
    model = trained_codes(tiny_model(codebook_stages=2, codebook_size=4))
    with open_bank(model, tmp_path / "bank.db") as bank:
        ingest(model, bank, (DOCUMENTS + MORE) * 3 + [d + " (again)" for d in DOCUMENTS])
        codes, counts = bank.code_counts()
        assert counts.sum() == len(bank) * model.config.num_slots and len(codes) < counts.sum()
        full, compact = FullReader(model, bank), CodeCountReader(model, bank)
        assert torch.allclose(full.modulation(QUESTIONS), compact.modulation(QUESTIONS), atol=1e-5)
        assert torch.allclose(
            full.modulation(QUESTIONS), model.modulation(QUESTIONS, model.memory(bank.entries())), atol=1e-5
        )


def test_readers_follow_the_bank_as_it_grows(tiny_model, tmp_path):
    model = codebook_of(trained_codes(tiny_model()), DOCUMENTS + MORE[:1])  # 16 codes for 4 x 4 vectors
    with open_bank(model, tmp_path / "bank.db") as bank:
        ingest(model, bank, DOCUMENTS)
        assert not set(bank.code_counts()[0].flatten()) & set(
            model.compress(MORE[:1]).flatten()
        )  # MORE[0] brings new codes
        reader = reader_for(model, bank)
        before = reader.modulation(QUESTIONS)
        ingest(model, bank, MORE)
        after = reader.modulation(QUESTIONS)
        assert not torch.allclose(before, after)
        assert torch.allclose(after, FullReader(model, bank).modulation(QUESTIONS), atol=1e-5)


def test_ingest_stores_each_content_once_and_keeps_ids(tiny_model, tmp_path):
    model = trained_codes(tiny_model())
    with open_bank(model, tmp_path / "bank.db") as bank:
        first = ingest(model, bank, DOCUMENTS + DOCUMENTS[:1], [{"n": i} for i in range(4)])
        assert (first.added, first.duplicates) == (3, 1) and first.ids[3] == first.ids[0]
        second = ingest(model, bank, DOCUMENTS[1:] + MORE[:1])
        assert (second.added, second.duplicates) == (1, 2) and second.ids[:2] == first.ids[1:3]
        assert len(bank) == 4 and bank.metadata(first.ids[0]) == {"n": 0}
        np.testing.assert_array_equal(bank.entries(first.ids[:3]), model.compress(DOCUMENTS))


def test_windowed_reader_over_one_window_is_plain_attention(tiny_model, tmp_path):
    model = tiny_model(quantize=False).eval()
    with open_bank(model, tmp_path / "mac.db") as bank:
        ingest(model, bank, DOCUMENTS + MORE)
        whole = WindowedReader(model, bank, window=16, top_k=64).modulation(QUESTIONS)
        assert torch.allclose(whole, FullReader(model, bank).modulation(QUESTIONS), atol=1e-5)
        windows = WindowedReader(model, bank, window=2, top_k=5).modulation(QUESTIONS)  # 5 docs -> 3 windows -> 2 -> 1
        assert windows.shape == whole.shape and torch.isfinite(windows).all()
        answers = answer_from_bank(model, reader_for(model, bank), QUESTIONS)
        assert len(answers) == 2


def test_windowed_reader_preselects_by_score(tiny_model, tmp_path):
    model = tiny_model(quantize=False).eval()
    with open_bank(model, tmp_path / "mac.db") as bank:
        ingest(model, bank, DOCUMENTS + MORE)
        reader = WindowedReader(model, bank, window=4, top_k=1)
        reader.modulation(QUESTIONS)  # builds the document keys
        queries = model.queries(QUESTIONS[:1])
        first = model.aggregator.blocks[0]
        best = int((first.to_q(first.norm_query(queries)).mean(1) @ reader.document_keys.T).argmax())
        alone = model.aggregator(queries, model.memory(bank.entries([reader.ids[best]])).view(1, -1, queries.shape[-1]))
        assert torch.allclose(reader.modulation(QUESTIONS[:1]), alone, atol=1e-5)


def test_a_bank_refuses_a_model_with_another_codebook(tiny_model, tmp_path):
    model = trained_codes(tiny_model())
    with open_bank(model, tmp_path / "bank.db") as bank:
        ingest(model, bank, DOCUMENTS)
    other = trained_codes(tiny_model(seed=1))
    with pytest.raises(MBCError, match="fingerprint"):
        open_bank(other, tmp_path / "bank.db")


def test_mode_mismatch_and_empty_bank_are_clear_errors(tiny_model, tmp_path):
    model = trained_codes(tiny_model())
    with open_bank(model, tmp_path / "bank.db") as bank:
        with pytest.raises(MBCError, match="empty"):
            reader_for(model, bank).modulation(QUESTIONS)
        mac = tiny_model(quantize=False)
        with pytest.raises(MBCError, match="cannot be read"):
            FullReader(mac, bank)
        with pytest.raises(MBCError, match="unknown reader"):
            reader_for(model, bank, "nearest")


@pytest.mark.parametrize("quantize", [True, False])
def test_retrieval_reader_equals_the_model_over_the_whole_bank(tiny_model, tmp_path, quantize):
    model = tiny_model(retrieval_top_k=2, retrieval_subspaces=4, retrieval_codes=4, quantize=quantize)
    model.retrieval_keys.fit(DOCUMENTS + MORE)
    model.train()
    model(DOCUMENTS + MORE, QUESTIONS, ["a", "b"], question_documents=[0, 1])  # real codes, as in trained_codes
    model.eval()
    with open_bank(model, tmp_path / "bank.db") as bank:
        first = ingest(model, bank, DOCUMENTS)
        reader = reader_for(model, bank)
        assert isinstance(reader, RetrievalReader)
        reader.modulation(QUESTIONS)
        ingest(model, bank, MORE)
        bank.remove(first.ids[1])  # the reader keeps its keys up to date: new documents keyed, removed ones dropped
        documents = model.memory(bank.entries()).view(len(bank), model.config.num_slots, -1)
        top = model.top_documents(QUESTIONS, bank.retrieval_keys())
        expected = model.read_documents(
            model.queries(QUESTIONS), documents[top]
        )  # decoding every document, then choosing
        assert torch.allclose(reader.modulation(QUESTIONS), expected, atol=1e-5)
        assert len(reader.ids) == len(bank) == 7
        top = model.top_documents(QUESTIONS, bank.retrieval_keys())
        assert reader.top_ids(QUESTIONS) == [[bank.ids()[p] for p in row] for row in top.tolist()]
        with pytest.raises(MBCError, match="RetrievalReader"):
            FullReader(model, bank)
