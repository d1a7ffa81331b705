"""catchup_mix against an independent slow reference (loops over samples and channels) and a hand example."""
import pytest
import torch

from catchup.mix import catchup_mix, filter_influence
from tests.helpers import reference_catchup, reference_keep


def random_case(seed, batch, channels, size, self_pairs=False):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(batch, channels, size, size, generator=g).relu()
    index = torch.arange(batch) if self_pairs else torch.randperm(batch, generator=g)
    return h, index


@pytest.mark.parametrize("seed,batch,channels,size", [
    (0, 4, 16, 5), (1, 7, 3, 2), (2, 1, 5, 3), (3, 5, 1, 4), (4, 8, 64, 1), (5, 3, 10, 7)])
@pytest.mark.parametrize("lam", [0.0, 0.13, 0.5, 0.77, 1.0])
@pytest.mark.parametrize("channels_last", [False, True])
def test_matches_slow_reference(seed, batch, channels, size, lam, channels_last):
    h, index = random_case(seed, batch, channels, size)
    if channels_last:
        h = h.to(memory_format=torch.channels_last)
    mixed, lam_eff = catchup_mix(h, index, lam)
    expected, expected_lam = reference_catchup(h, index, lam)
    assert lam_eff == expected_lam
    assert torch.equal(mixed.double(), expected)
    assert mixed.dtype == h.dtype and mixed.shape == h.shape
    if channels_last:
        assert mixed.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("seed", range(4))
def test_bfloat16_matches_reference_on_the_same_values(seed):
    h, index = random_case(seed, 6, 32, 4)
    h = h.to(torch.bfloat16)
    mixed, _ = catchup_mix(h, index, 0.6)
    expected, _ = reference_catchup(h, index, 0.6)
    assert mixed.dtype == torch.bfloat16
    assert torch.equal(mixed.double(), expected)


def test_influence_is_float32_and_does_not_overflow_in_half():
    h = torch.full((2, 3, 16, 16), 300.0, dtype=torch.float16)   # 300^2 * 256 overflows fp16
    fi = filter_influence(h)
    assert fi.dtype == torch.float32
    assert torch.allclose(fi, torch.full((2, 3), 1 / 3))


def test_self_paired_samples_are_unchanged():
    h, index = random_case(7, 5, 12, 3, self_pairs=True)
    for lam in (0.0, 0.4, 1.0):
        mixed, _ = catchup_mix(h, index, lam)
        assert torch.equal(mixed, h)


def test_all_zero_sample_gives_no_nan_and_breaks_ties_by_channel_index():
    h = torch.zeros(2, 4, 2, 2)
    h[1] = torch.arange(16.0).view(4, 2, 2)
    mixed, lam_eff = catchup_mix(h, torch.tensor([1, 0]), 0.5)
    assert not torch.isnan(mixed).any() and lam_eff == 0.5
    expected, _ = reference_catchup(h, torch.tensor([1, 0]), 0.5)
    assert torch.equal(mixed.double(), expected)


def test_hand_worked_example():
    # Sample 0: channel norms 5, 2, 0, 1 (sum 8); sample 1: every channel all ones, norm 2 (sum 8).
    h0 = torch.tensor([[[3., 4.], [0., 0.]], [[0., 0.], [0., 2.]], [[0., 0.], [0., 0.]], [[1., 0.], [0., 0.]]])
    h1 = torch.ones(4, 2, 2)
    h = torch.stack([h0, h1])
    index = torch.tensor([1, 0])
    # RFI of sample 0 = (5-2, 2-2, 0-2, 1-2)/8 = (3, 0, -2, -1)/8 -> ascending order: c2, c3, c1, c0.
    # RFI of sample 1 is its negative -> ascending order: c0, c1, c3, c2.
    mixed, lam_eff = catchup_mix(h, index, 0.5)      # keep 2 channels
    assert lam_eff == 0.5
    assert torch.equal(mixed[0], torch.stack([h1[0], h1[1], h0[2], h0[3]]))
    assert torch.equal(mixed[1], torch.stack([h1[0], h1[1], h0[2], h0[3]]))
    mixed, lam_eff = catchup_mix(h, index, 0.8)      # floor(3.2) = 3 channels kept
    assert lam_eff == 0.75
    assert torch.equal(mixed[0], torch.stack([h1[0], h0[1], h0[2], h0[3]]))
    assert torch.equal(mixed[1], torch.stack([h1[0], h1[1], h0[2], h1[3]]))


def test_gradients_reach_kept_and_partner_channels():
    h, index = random_case(11, 4, 6, 3)
    h.requires_grad_(True)
    weight = torch.randn(h.shape, generator=torch.Generator().manual_seed(1))
    mixed, _ = catchup_mix(h, index, 0.5)
    (mixed * weight).sum().backward()
    # Independent expectation: out[i, c] reads h[i, c] if kept, else h[index[i], c].
    expected = torch.zeros_like(h)
    for i, keep in enumerate(reference_keep(h, index, 0.5)):
        for c in range(6):
            expected[i if c in keep else int(index[i]), c] += weight[i, c]
    assert torch.allclose(h.grad, expected)
    kept = reference_keep(h, index, 0.5)
    assert all(0 < len(k) < 6 for k in kept)   # each sample both kept and took channels


def test_rejects_lam_outside_unit_interval():
    h, index = random_case(0, 2, 4, 2)
    with pytest.raises(ValueError, match="lam"):
        catchup_mix(h, index, 1.5)
