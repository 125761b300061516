import numpy as np
import pytest
import torch
from conftest import ANSWERS, DOCUMENTS, QUESTIONS

from mbc import MBCModel
from mbc.bank import BankLayout, MemoryBank
from mbc.errors import MBCError
from mbc.memory.ingest import ingest
from mbc.memory.readers import reader_for
from mbc.network.retrieval import ProductQuantizer

MORE = [
    f"Harbour {i} of the {w} coast keeps {i + 2} lighthouses." for i, w in enumerate("old new red far wide".split())
]
KEYS = dict(retrieval_subspaces=4, retrieval_codes=4)


def test_product_quantizer_keys_find_the_nearest_embedding():
    torch.manual_seed(0)
    centres = torch.nn.functional.normalize(torch.randn(6, 16), dim=-1)
    points = torch.nn.functional.normalize(centres.repeat(20, 1) + 0.05 * torch.randn(120, 16), dim=-1)
    quantizer = ProductQuantizer(16, subspaces=4, codes=8)
    with pytest.raises(MBCError, match="not fitted"):
        quantizer.encode(points)
    quantizer.fit(points)
    keys = quantizer.encode(centres)
    assert keys.shape == (6, 4) and int(keys.max()) < 8
    decoded = torch.stack([torch.cat([quantizer.centroids[s, keys[n, s]] for s in range(4)]) for n in range(6)])
    scores = quantizer.scores(centres, keys)
    assert torch.allclose(
        scores, centres @ decoded.T, atol=1e-5
    )  # asymmetric distance = inner product with the decoded keys
    assert torch.equal(scores.argmax(1), torch.arange(6))  # every centre finds its own key


def test_product_quantizer_refuses_bad_settings():
    with pytest.raises(MBCError, match="divide"):
        ProductQuantizer(10, subspaces=4)
    with pytest.raises(MBCError, match="at least 8 training documents"):
        ProductQuantizer(8, subspaces=2, codes=8).fit(torch.randn(5, 8))


def keyed_model(tiny_model, llm: str = "llama", encoder: str = "bert", **overrides) -> MBCModel:
    model = tiny_model(llm, encoder, **{**KEYS, "retrieval_top_k": 2, **overrides})
    model.retrieval_keys.fit(DOCUMENTS + MORE)
    return model


@pytest.mark.parametrize("encoder", ["bert", "t5"])
def test_key_encoder_is_a_frozen_copy_of_the_pretrained_encoder(tiny_model, encoder):
    model = keyed_model(tiny_model, encoder=encoder)
    assert model.retrieval_keys.embedder.encoder is not model.amortization.encoder
    assert not any(p.requires_grad for p in model.retrieval_keys.embedder.parameters())
    assert any(p.requires_grad for p in model.amortization.encoder.parameters())
    model.train()
    assert not model.retrieval_keys.embedder.training
    embeddings = model.retrieval_keys.embedder(DOCUMENTS)
    assert torch.allclose(embeddings.norm(dim=-1), torch.ones(3), atol=1e-5)


def test_each_question_reads_only_its_top_documents(tiny_model):
    model = keyed_model(tiny_model).eval()
    texts = DOCUMENTS + MORE
    memory, keys = model.memory(model.compress(texts)), model.retrieval_keys.keys_of(texts)
    assert keys.shape == (8, 4) and keys.dtype == np.uint8
    documents = memory.view(8, model.config.num_slots, -1)
    top = model.top_documents(QUESTIONS, keys)
    assert top.shape == (2, 2)
    queries = model.queries(QUESTIONS)
    expected = torch.cat(
        [model.aggregator(queries[b : b + 1], documents[top[b]].reshape(1, -1, documents.shape[-1])) for b in range(2)]
    )
    with MemoryBank.in_memory(BankLayout.of(model)) as bank:
        ingest(model, bank, texts)
        assert torch.allclose(reader_for(model, bank).modulation(QUESTIONS), expected, atol=1e-5)
    with pytest.raises(MBCError, match="RetrievalReader"):
        model.modulation(QUESTIONS, memory)


def test_training_reads_the_own_document_first(tiny_model):
    model = keyed_model(tiny_model)
    assert model._training_reads(QUESTIONS, DOCUMENTS, [2, 0])[:, 0].tolist() == [2, 0]
    assert model._training_reads(QUESTIONS, DOCUMENTS, [2, 0]).shape == (2, 2)
    out = model(DOCUMENTS, QUESTIONS, ANSWERS, question_documents=[0, 1])
    assert torch.isfinite(out.loss)
    with pytest.raises(MBCError, match="question_documents"):
        model(DOCUMENTS, QUESTIONS, ANSWERS)
    one = keyed_model(tiny_model, retrieval_top_k=1)
    assert one._training_reads(QUESTIONS, DOCUMENTS, [1, 2]).tolist() == [[1], [2]]


def test_retrieval_keys_are_saved_and_fingerprinted(tiny_model, tmp_path):
    model = keyed_model(tiny_model)
    before = model.codebook_fingerprint()
    model.save_pretrained(tmp_path / "ckpt")
    loaded = MBCModel.from_pretrained(tmp_path / "ckpt")
    assert torch.equal(loaded.retrieval_keys.centroids, model.retrieval_keys.centroids) and bool(
        loaded.retrieval_keys.fitted
    )
    np.testing.assert_array_equal(loaded.retrieval_keys.keys_of(DOCUMENTS), model.retrieval_keys.keys_of(DOCUMENTS))
    model.retrieval_keys.quantizer.centroids += 0.1
    assert model.codebook_fingerprint() != before
