import torch
from conftest import DOCUMENTS, QUESTIONS

from mbc.network.aggregation import Aggregator


def test_attention_over_code_counts_equals_attention_over_the_bank():
    """docs/METHOD.md: with every stored vector a codebook entry, attending over the C codes with
    log-count weights gives the same result as attending over every vector of the bank."""
    torch.manual_seed(0)
    codebook = torch.randn(16, 32)
    indices = torch.randint(0, 10, (300,))  # codes 10..15 never occur
    aggregator = Aggregator(32, num_blocks=3, heads=4, head_dim=8).eval()
    queries = torch.randn(5, 4, 32)
    full = aggregator(queries, codebook[indices][None])
    counts = torch.bincount(indices, minlength=16).float()
    compact = aggregator(queries, codebook[None], memory_log_weight=counts.log()[None])
    assert torch.allclose(full, compact, atol=1e-5)


def test_bank_is_a_set_order_does_not_matter():
    torch.manual_seed(0)
    aggregator = Aggregator(32, num_blocks=2, heads=4, head_dim=8).eval()
    memory, queries = torch.randn(1, 50, 32), torch.randn(3, 4, 32)
    shuffled = memory[:, torch.randperm(50)]
    assert torch.allclose(aggregator(queries, memory), aggregator(queries, shuffled), atol=1e-5)


def test_model_modulation_accepts_code_count_weights(tiny_model):
    model = tiny_model().train()
    model(DOCUMENTS, QUESTIONS * 2 + QUESTIONS[:1], ["a", "b", "c", "d", "e"])  # revives codes from data
    model.eval()
    entries = model.compress(DOCUMENTS * 4)
    full = model.modulation(QUESTIONS, model.memory(entries))
    counts = torch.bincount(torch.as_tensor(entries[..., 0].astype("int64")).flatten(), minlength=16).float()
    codes = model.quantizer.stages[0].codebook.detach()
    compact = model.modulation(QUESTIONS, codes, memory_log_weight=counts.log())
    assert torch.allclose(full, compact, atol=1e-5)


def reads_of(aggregator, queries, memory):
    """The sum of what each block reads from the memory, recomputed block by block."""
    x, total = queries, 0
    for block in aggregator.blocks:
        read = block.read(x, memory)
        x, total = block.feed_forward(x + read), total + read
    return total


def test_reads_output_carries_only_what_was_read_from_memory():
    torch.manual_seed(0)
    aggregator = Aggregator(32, num_blocks=2, heads=4, head_dim=8, output="reads").eval()
    queries, memory = torch.randn(3, 4, 32), torch.randn(1, 20, 32)
    out = aggregator(queries, memory)
    assert torch.allclose(out, reads_of(aggregator, queries, memory))
    for block in aggregator.blocks:  # nothing read -> nothing out, whatever the queries
        torch.nn.init.zeros_(block.to_out.weight)
        torch.nn.init.zeros_(block.to_out.bias)
    assert torch.equal(aggregator(queries, memory), torch.zeros_like(out))
    residual = Aggregator(32, num_blocks=2, heads=4, head_dim=8).eval()
    assert not torch.allclose(residual(queries, memory), reads_of(residual, queries, memory))
