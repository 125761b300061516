"""BM25 over token ids (network/lexical.py): the scores by the formula, and what a bank of kept
tokens makes of them."""

import math

import torch

from mbc.network.lexical import bm25, combined, standardised

PAD = 99


def test_scores_follow_okapi_bm25_over_the_distinct_tokens_of_a_question():
    documents = torch.tensor([[1, 1, 2, PAD], [2, 3, 4, 5], [6, 7, PAD, PAD]])
    scores = bm25([[1, 2, 2], [3], [42]], documents, PAD)  # 2 asked twice counts once; 42 is nowhere

    lengths, k1, b = [3, 4, 2], 1.5, 0.75
    average = sum(lengths) / 3

    def term(frequency, holding, length):
        idf = math.log(1 + (3 - holding + 0.5) / (holding + 0.5))
        return idf * frequency * (k1 + 1) / (frequency + k1 * (1 - b + b * length / average))

    expected = torch.tensor(
        [
            [term(2, 1, 3) + term(1, 2, 3), term(1, 2, 4), 0.0],
            [0.0, term(1, 1, 4), 0.0],
            [0.0, 0.0, 0.0],
        ]
    )
    assert torch.allclose(scores, expected, atol=1e-6)


def test_a_rare_shared_token_outweighs_a_common_one():
    documents = torch.tensor([[10, 11], [10, 12], [10, 13], [10, 14]])
    scores = bm25([[10, 13]], documents, PAD)[0]
    assert scores.argmax() == 2 and scores[2] > 2 * scores[0]


def test_a_bank_of_padding_alone_scores_nothing():
    assert torch.equal(bm25([[1, 2]], torch.full((2, 3), PAD), PAD), torch.zeros(1, 2))


def test_combined_is_the_key_alone_at_weight_0_and_finite_over_one_document():
    keys, lexical = torch.tensor([[0.2, 0.5, 0.1]]), torch.tensor([[9.0, 0.0, 0.0]])
    assert torch.equal(combined(keys, lexical, 0.0), keys)
    assert combined(keys, lexical, 1.0).argmax() == 0  # the lexical match wins at this weight
    assert combined(keys, lexical, 0.1).argmax() == 1
    single = combined(torch.tensor([[0.3]]), torch.tensor([[2.0]]), 0.3)
    assert torch.isfinite(single).all()
    assert torch.allclose(standardised(torch.tensor([[1.0, 3.0]])), torch.tensor([[-1.0, 1.0]]))
