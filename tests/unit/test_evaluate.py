import torch
from scipy.stats import spearmanr

from distil.eval.measures import agreement, mean_pool, pairwise_cosines, spearman


def test_spearman_equals_scipy_with_ties():
    g = torch.Generator().manual_seed(0)
    a = torch.randint(0, 20, (300,), generator=g).double()  # many ties
    b = a + torch.randn(300, generator=g, dtype=torch.float64) * 5
    assert abs(spearman(a, b) - spearmanr(a.numpy(), b.numpy()).statistic) < 1e-12


def test_mean_pool_ignores_padding():
    h = torch.arange(12.0).reshape(1, 4, 3)
    mask = torch.tensor([[1, 1, 0, 0]])
    assert torch.equal(mean_pool(h, mask), torch.tensor([[1.5, 2.5, 3.5]]))


def test_agreement_is_one_for_identical_rankings_and_lower_for_noise():
    g = torch.Generator().manual_seed(1)
    e = torch.randn(30, 16, generator=g)
    assert len(pairwise_cosines(e)) == 30 * 29 // 2
    assert abs(agreement(e, 2 * e) - 1.0) < 1e-12  # scale does not change cosines
    noisy = agreement(e, e + torch.randn(30, 16, generator=g))
    assert 0.2 < noisy < 0.95
