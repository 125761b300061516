import numpy as np
import pytest

from mbc.errors import MBCError
from mbc.network.token_coding import TokenCoder, huffman_lengths

VOCABULARY = 1000


@pytest.fixture(scope="module")
def coder():
    # Zipf-like training documents: low ids frequent, high ids rare or never seen.
    generator = np.random.default_rng(0)
    documents = [(generator.zipf(1.3, size=80) - 1) % VOCABULARY for _ in range(200)]
    return TokenCoder.fit([d.tolist() for d in documents], VOCABULARY)


def test_the_code_is_complete_and_frequent_tokens_get_shorter_codes(coder):
    assert sum(2.0**-coder.lengths) == pytest.approx(1.0)  # Kraft: a full prefix code
    assert coder.lengths[0] < coder.lengths[500] <= coder.lengths[999]
    assert coder.vocabulary == VOCABULARY and len(coder.lengths) == VOCABULARY + 1  # every token, and END


def test_ids_come_back_from_a_fixed_number_of_bytes(coder):
    generator = np.random.default_rng(1)
    for size in (0, 1, 7, 40):
        ids = generator.integers(0, VOCABULARY, size).tolist()
        budget = (coder.bits(ids) + 7) // 8 + 3
        data = coder.encode(ids, budget)
        assert len(data) == budget and coder.decode(data) == ids


def test_the_best_that_fit_fill_the_budget_and_skip_a_long_code_for_shorter_ones(coder):
    ranked = [999, 0, 1, 2, 3, 998, 4, 5] * 10  # rare, then frequent
    chosen = coder.most_that_fit(ranked, 8)
    assert coder.bits([ranked[p] for p in chosen]) <= 64
    left_out = [p for p in range(len(ranked)) if p not in chosen]
    assert left_out and any(coder.lengths[ranked[p]] > coder.lengths[0] for p in left_out)
    assert len(chosen) > 64 // 16  # more tokens than 16 bits a token would hold


def test_the_longest_head_that_fits_keeps_the_order_and_stops_at_the_first_id_past_the_budget(coder):
    ids = [0, 1, 999, 2, 3] * 10
    head = coder.longest_head(ids, 8)
    assert head == ids[: len(head)] and coder.bits(head) <= 64 < coder.bits(ids[: len(head) + 1])
    assert coder.longest_head(ids[:3], 100) == ids[:3] and coder.longest_head([], 1) == []


def test_entries_that_do_not_fit_or_lack_their_end_are_refused_in_one_line(coder):
    with pytest.raises(MBCError, match="more than the entry's 2 bytes"):
        coder.encode([999] * 10, 2)
    full = coder.encode([0] * 30, 64)
    with pytest.raises(MBCError, match="without its END symbol"):
        coder.decode(full[:2])


def test_huffman_lengths_match_a_known_code():
    # counts 1, 1, 2, 4: lengths 3, 3, 2, 1
    assert huffman_lengths(np.array([1.0, 1.0, 2.0, 4.0])).tolist() == [3, 3, 2, 1]
    with pytest.raises(MBCError, match="at least two symbols"):
        huffman_lengths(np.array([1.0]))


def test_an_entry_holds_at_most_most_ids_ids_however_short_their_codes(coder):
    shortest = int(np.argmin(coder.lengths[: coder.end]))
    most = coder.most_ids(4)
    assert coder.decode(coder.encode([shortest] * most, 4)) == [shortest] * most
    with pytest.raises(MBCError):
        coder.encode([shortest] * (most + 1), 4)
