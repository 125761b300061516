import numpy as np
import pytest
import torch

from mbc import MBCError, ResidualQuantizer, VectorQuantizer
from mbc.bank.packing import bits_for, index_dtype, pack_indices, packed_size, unpack_indices
from mbc.network.codebook import fingerprint, kmeans


def test_nearest_code_and_straight_through():
    torch.manual_seed(0)
    vq = VectorQuantizer(num_codes=8, dim=4).eval()
    z = torch.randn(5, 3, 4, requires_grad=True)
    out = vq(z)
    distances = torch.cdist(z.detach().reshape(-1, 4), vq.codebook.detach())
    assert torch.equal(out.indices[..., 0].flatten(), distances.argmin(1))
    assert torch.allclose(out.quantized, vq.codebook[out.indices[..., 0]], atol=1e-6)  # forward value: the code
    (out.quantized * torch.arange(4.0)).sum().backward()
    assert torch.equal(z.grad, torch.arange(4.0).expand(5, 3, 4))  # gradient: as if unquantized


def test_vq_loss_is_codebook_plus_beta_commitment():
    torch.manual_seed(0)
    vq = VectorQuantizer(num_codes=8, dim=4, beta=0.25).eval()
    z = torch.randn(10, 4)
    out = vq(z)
    mse = ((vq.codebook[out.indices[:, 0]] - z) ** 2).mean()
    assert torch.allclose(out.loss, 1.25 * mse)


def test_dead_codes_revived_in_training_only():
    torch.manual_seed(0)
    vq = VectorQuantizer(num_codes=16, dim=4)
    vq.codebook.data[15] = 1e3  # far from every vector: at least one code this batch does not pick
    z = torch.randn(64, 4) * 3
    vq.eval()
    before = vq.codebook.detach().clone()
    picked = torch.zeros(16, dtype=torch.bool)
    picked[vq(z).indices.flatten()] = True
    assert torch.equal(vq.codebook, before) and vq.usage.sum() == 0  # eval: nothing moves
    assert not picked.all()
    vq.train()
    vq(z)
    changed = (vq.codebook.detach() != before).any(dim=1)
    # Usage starts at zero, so every code this batch did not pick is dead and revived; picked ones stay.
    assert torch.equal(changed, ~picked)
    batch_rows = {tuple(row.tolist()) for row in z}
    assert all(tuple(row.tolist()) in batch_rows for row in vq.codebook.detach()[changed])  # revived from this batch
    assert (vq.usage > 0).all()


def test_code_that_stops_being_used_dies_and_is_revived():
    torch.manual_seed(0)
    vq = VectorQuantizer(num_codes=4, dim=2, ema_decay=0.5, dead_threshold=1e-3).train()
    vq.codebook.data = torch.tensor([[0.0, 0.0], [10.0, 10.0], [-10.0, 10.0], [100.0, 100.0]])
    vq.usage.fill_(0.25)
    near_first_three = torch.tensor([[0.1, 0.0], [10.0, 9.9], [-10.0, 9.9]]).repeat(4, 1)
    for _ in range(20):  # code 3 is never picked: its usage halves every step until it is dead
        before = vq.codebook.detach().clone()
        vq(near_first_three)
        if not torch.equal(before[3], vq.codebook.detach()[3]):
            break
    assert not torch.equal(vq.codebook.detach()[3], torch.tensor([100.0, 100.0]))
    assert vq.usage[3] > vq.dead_threshold


def test_ema_codes_follow_the_running_mean_of_their_vectors_without_gradients():
    vq = VectorQuantizer(num_codes=2, dim=2, ema_decay=0.5, update="ema").train()
    vq.fit(torch.tensor([[0.0, 0.0], [10.0, 10.0]]))
    assert torch.equal(vq.codebook, torch.tensor([[0.0, 0.0], [10.0, 10.0]])) and not vq.codebook.requires_grad
    z = torch.tensor([[1.0, 0.0], [3.0, 0.0], [10.0, 12.0], [10.0, 14.0]], requires_grad=True)
    out = vq(z)
    # Each code moves halfway (decay 0.5, equal shares) to the mean of the vectors it was picked for.
    assert torch.allclose(vq.codebook, torch.tensor([[1.0, 0.0], [10.0, 11.5]]))
    out.loss.backward()
    assert z.grad.abs().sum() > 0  # the commitment term still trains the encoder
    for _ in range(30):
        vq(z.detach())
    assert torch.allclose(vq.codebook, torch.tensor([[2.0, 0.0], [10.0, 13.0]]), atol=1e-4)
    with pytest.raises(ValueError, match="update"):
        VectorQuantizer(update="adam")


def test_ema_dead_codes_are_revived_and_then_followed():
    torch.manual_seed(0)
    vq = VectorQuantizer(num_codes=8, dim=3, update="ema").train()
    z = torch.randn(40, 3)
    vq(z)  # usage starts at zero: unpicked codes are revived from the batch
    assert (vq.usage > 0).all()
    assert torch.allclose(vq.code_sums, vq.codebook * vq.usage[:, None], atol=1e-6)  # consistent running state


def test_decoding_stored_indices_reproduces_quantized_vectors():
    torch.manual_seed(0)
    rq = ResidualQuantizer(num_stages=3, num_codes=32, dim=6)
    rq.train()
    rq(torch.randn(200, 6))  # revive codes from data so that the stages are not trivial
    rq.eval()
    z = torch.randn(7, 5, 6)
    out = rq(z)
    assert out.indices.shape == (7, 5, 3)
    assert torch.allclose(rq.decode(out.indices), out.quantized, atol=1e-6)


def test_cosine_metric_picks_codes_by_direction_and_decodes_them_at_norm_sqrt_dim():
    codes = torch.tensor([[10.0, 0.0], [0.1, 0.1]])
    z = torch.tensor([[1.0, 0.2]])
    l2, cosine = VectorQuantizer(num_codes=2, dim=2).eval(), VectorQuantizer(num_codes=2, dim=2, metric="cosine").eval()
    l2.codebook.data, cosine.codebook.data = codes.clone(), codes.clone()
    assert l2(z).indices.item() == 1  # L2: the small code near the centre is nearest
    out = cosine(z)
    assert out.indices.item() == 0  # cosine: the code pointing the same way
    assert torch.allclose(out.quantized, torch.tensor([[2**0.5, 0.0]]))
    assert torch.allclose(cosine.decode(torch.tensor([0, 1])).norm(dim=-1), torch.full((2,), 2**0.5))
    rq = ResidualQuantizer(num_codes=8, dim=4, metric="cosine").train()
    rq(torch.randn(50, 4) * 5)
    rq.eval()
    out = rq(torch.randn(3, 4) * 7)
    assert torch.allclose(rq.decode(out.indices), out.quantized, atol=1e-6)
    with pytest.raises(ValueError, match="metric"):
        VectorQuantizer(metric="dot")


def test_kmeans_finds_separated_clusters():
    torch.manual_seed(0)
    centres = torch.tensor([[10.0, 0.0], [-10.0, 0.0]])  # two clusters: Lloyd's finds both from any start
    points = torch.cat([c + 0.1 * torch.randn(50, 2) for c in centres])
    found = kmeans(points, 2, 10, torch.Generator().manual_seed(1))
    assert torch.cdist(found, centres).min(0).values.max() < 0.1  # every centre has a centroid next to it


def test_residual_stages_reduce_error():
    torch.manual_seed(0)
    z = torch.randn(500, 8)
    errors = []
    for stages in (1, 2, 4):
        rq = ResidualQuantizer(num_stages=stages, num_codes=16, dim=8).train()
        for _ in range(3):
            rq(z)
        rq.eval()
        errors.append(((rq(z).quantized - z) ** 2).mean().item())
    assert errors[0] > errors[1] > errors[2]


def test_fingerprint_changes_with_the_codebook():
    rq = ResidualQuantizer(num_stages=1, num_codes=8, dim=4)
    first = fingerprint(rq.tables())
    assert fingerprint(rq.tables()) == first
    rq.stages[0].codebook.data[0, 0] += 1e-3
    assert fingerprint(rq.tables()) != first


@pytest.mark.parametrize("num_codes", [1, 2, 3, 255, 256, 257, 511, 512, 513, 1000, 4096, 32767, 32768, 65535, 65536])
def test_bit_packing_round_trips(num_codes):
    rng = np.random.default_rng(num_codes)
    indices = rng.integers(0, num_codes, size=(13, 12, 2)).astype(index_dtype(num_codes))
    indices[0, 0, 0], indices[0, 0, 1] = 0, num_codes - 1  # both extremes
    data = pack_indices(indices, num_codes)
    assert len(data) == packed_size(indices.size, num_codes)
    restored = unpack_indices(data, indices.size, num_codes)
    assert restored.dtype == index_dtype(num_codes)
    assert np.array_equal(restored.reshape(indices.shape), indices)


def test_every_bit_width_up_to_16_round_trips():
    for bits in range(1, 17):
        num_codes = 2**bits
        values = np.arange(num_codes, dtype=np.uint64)[:: max(1, num_codes // 1000)]
        assert np.array_equal(unpack_indices(pack_indices(values, num_codes), len(values), num_codes), values)


def test_storage_types_and_sizes():
    assert index_dtype(256) == np.uint8 and index_dtype(257) == np.uint16 and index_dtype(65536) == np.uint16
    assert index_dtype(65537) == np.uint32
    assert bits_for(512) == 9 and packed_size(12, 512) == 14  # the paper's K=12, C=512: 13.5 -> 14 bytes


def test_packing_rejects_bad_input():
    with pytest.raises(MBCError, match="out of range"):
        pack_indices(np.array([16]), 16)
    with pytest.raises(MBCError, match="truncated"):
        unpack_indices(pack_indices(np.arange(10), 512)[:-1], 10, 512)
