import math

import pytest
import torch
from scipy.stats import kendalltau

from diag.transfer.metrics import ermse, ermse_image_specific, iou_at_k, iou_chance, kendall_tau, scaled_ks, score
from train.losses import alpha_loss, explanation_loss, zscore


def test_scaled_ks_match_paper_and_never_exceed_its_fraction():
    assert scaled_ks(49) == (1, 5, 10)
    assert scaled_ks(16) == (1, 1, 3)
    assert scaled_ks(256) == (5, 26, 52)
    for m in range(10, 300):
        assert all(k <= max(1, f * m / 49) for k, f in zip(scaled_ks(m), (1, 5, 10)))


def test_iou_chance_is_the_mean_iou_of_random_top_k_sets():
    assert iou_chance(16, 1) == pytest.approx(1 / 16)
    g = torch.Generator().manual_seed(5)
    a, b = torch.rand(20000, 16, generator=g), torch.rand(20000, 16, generator=g)
    assert float(iou_at_k(a, b, 3).mean()) == pytest.approx(iou_chance(16, 3), abs=0.004)
    s = score("m", None, torch.zeros(3), torch.randn(3, 49), torch.randn(3, 49), accuracy=1.0)
    assert s.iou_chance == pytest.approx((1 / 49, iou_chance(49, 5), iou_chance(49, 10)))


def test_image_specific_ermse_gives_a_constant_prior_exactly_one():
    g = torch.Generator().manual_seed(6)
    prior = torch.randn(16, generator=g, dtype=torch.float64)
    true = prior + 0.5 * torch.randn(300, 16, generator=g, dtype=torch.float64)
    const = prior.expand(300, 16)
    assert ermse(const, true) < 1.0                      # the prior looks good on plain E-RMSE
    assert ermse_image_specific(const, true) == pytest.approx(1.0, abs=1e-6)  # z-score eps
    assert ermse_image_specific(true, true) == pytest.approx(0.0, abs=1e-9)
    # explicit mean maps: centring the truth by its own mean is the default
    assert ermse_image_specific(true, true, true_mean=true.mean(0)) == pytest.approx(0.0, abs=1e-9)
    s = score("m", None, torch.zeros(300), const, true, accuracy=1.0, true_mean=prior)
    assert s.ermse_img == pytest.approx(1.0, abs=1e-6) and "ermse_img" in s.to_dict()


def test_ermse_zero_for_affine_copies_and_sqrt2_for_unrelated_maps():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(200, 49, generator=g, dtype=torch.float64)
    assert ermse(3 * a + 1, a) == pytest.approx(0.0, abs=1e-6)
    assert ermse(-a, a) == pytest.approx(2.0, abs=1e-6)
    b = torch.randn(4000, 49, generator=g, dtype=torch.float64)
    c = torch.randn(4000, 49, generator=g, dtype=torch.float64)
    assert ermse(b, c) == pytest.approx(math.sqrt(2), abs=0.01)


def test_ermse_is_sqrt_of_eq5_per_patch():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(7, 16, generator=g), torch.randn(7, 16, generator=g)
    assert ermse(a, b) == pytest.approx(math.sqrt(float(explanation_loss(a, b))), rel=1e-5)


def test_ermse_is_sqrt_of_the_training_loss_on_a_batch():
    """E-RMSE of the labelled-class maps = sqrt(L_exp) of L_α at α = 0 on the same batch (float64)."""
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(9, 5, generator=g, dtype=torch.float64)
    phi = torch.randn(9, 5, 49, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 5, (9,), generator=g)
    target = torch.randn(9, 49, generator=g, dtype=torch.float64)
    l_exp = float(alpha_loss(logits, phi, labels, target, 0.0))
    picked = phi[torch.arange(9), labels]
    assert ermse(picked, target) == pytest.approx(math.sqrt(l_exp), rel=1e-12)
    manual = ((zscore(picked) - zscore(target)) ** 2).sum() / (9 * 49)  # mean over images and patches
    assert l_exp == pytest.approx(float(manual), rel=1e-12)


def test_kendall_matches_scipy_including_ties():
    g = torch.Generator().manual_seed(2)
    a = torch.randn(5, 12, generator=g)
    b = torch.randn(5, 12, generator=g)
    b[:, :3] = 0.0  # ties
    ours = kendall_tau(a, b)
    for i in range(5):
        assert float(ours[i]) == pytest.approx(kendalltau(a[i].numpy(), b[i].numpy()).statistic, abs=1e-9)


def test_iou_by_hand():
    pred = torch.tensor([[5.0, 4.0, 3.0, 2.0, 1.0]])
    true = torch.tensor([[5.0, 1.0, 4.0, 2.0, 3.0]])
    assert float(iou_at_k(pred, true, 1)) == 1.0          # {0} vs {0}
    assert float(iou_at_k(pred, true, 2)) == pytest.approx(1 / 3)  # {0,1} vs {0,2}
    assert float(iou_at_k(pred, true, 3)) == pytest.approx(2 / 4)  # {0,1,2} vs {0,2,4}


def test_score_accuracy_and_ks():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [3.0, 0.0]])
    labels = torch.tensor([0, 1, 1])
    phi = torch.randn(3, 16)
    s = score("m", logits, labels, phi, phi)
    assert s.accuracy == pytest.approx(2 / 3) and s.ks == (1, 1, 3)
    assert s.ermse == pytest.approx(0.0, abs=1e-6) and s.kendall == pytest.approx(1.0) and s.iou10 == 1.0


def test_alpha_loss_interpolates_ce_and_explanation_loss():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(4, 3, generator=g)
    phi = torch.randn(4, 3, 16, generator=g)
    labels = torch.tensor([0, 2, 1, 2])
    target = torch.randn(4, 16, generator=g)
    ce = torch.nn.functional.cross_entropy(logits, labels)
    picked = phi[torch.arange(4), labels]
    exp = ((zscore(picked) - zscore(target)) ** 2).mean()
    assert float(alpha_loss(logits, phi, labels, target, 1.0)) == pytest.approx(float(ce))
    assert float(alpha_loss(logits, phi, labels, target, 0.8)) == pytest.approx(float(0.8 * ce + 0.2 * exp), rel=1e-6)
    from train.errors import TvdiagError
    from train.losses import check_alpha

    with pytest.raises(TvdiagError):
        check_alpha(1.5)
    with pytest.raises(TvdiagError):
        check_alpha(-0.1)


def test_image_correlation_by_hand_and_its_limits():
    from diag.transfer.metrics import image_correlations

    zero = torch.zeros(3, dtype=torch.float64)
    pred = torch.tensor([[1.0, 0.0, -1.0]], dtype=torch.float64)
    true = torch.tensor([[1.0, -1.0, 0.0]], dtype=torch.float64)
    # centred maps [1, 0, −1] and [1, −1, 0]: ⟨a, b⟩ = 1, ‖a‖ = ‖b‖ = √2 → ρ = 1/2
    assert image_correlations(pred, true, zero, zero).item() == pytest.approx(0.5, abs=1e-15)
    phi = torch.randn(20, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    mu = phi.mean(0)
    assert torch.allclose(image_correlations(3 * phi + 2, phi, 3 * mu + 2, mu), torch.ones(20, dtype=torch.float64))
    assert torch.allclose(image_correlations(-phi, phi, -mu, mu), -torch.ones(20, dtype=torch.float64))
    prior = mu.expand_as(phi)  # a fixed spatial prior: its centred map is 0 → ρ = 0 for every image
    assert torch.equal(image_correlations(prior, phi, mu, mu), torch.zeros(20, dtype=torch.float64))


def test_image_specific_ermse_is_two_minus_two_rho():
    """For z-scored centred maps E-RMSE_img² = 2 − 2ρ̄: why a prior's 1 is beaten only at ρ̄ > 0.5."""
    from diag.transfer.metrics import ermse_image_specific, image_correlations

    g = torch.Generator().manual_seed(1)
    true = torch.randn(30, 16, dtype=torch.float64, generator=g)
    pred = 0.4 * true + torch.randn(30, 16, dtype=torch.float64, generator=g)
    rho = image_correlations(pred, true)
    assert ermse_image_specific(pred, true) ** 2 == pytest.approx(2 - 2 * rho.mean().item(), rel=1e-6)


def test_paired_difference_is_the_mean_and_se_of_per_image_differences():
    from diag.transfer.metrics import paired_corr_difference, score

    g = torch.Generator().manual_seed(2)
    true = torch.randn(25, 16, dtype=torch.float64, generator=g)
    labels = torch.zeros(25, dtype=torch.long)
    good = score("a", None, labels, true + 0.5 * torch.randn(25, 16, dtype=torch.float64, generator=g), true, 1.0)
    bad = score("b", None, labels, torch.randn(25, 16, dtype=torch.float64, generator=g), true, 1.0)
    d = good.per_image_corr - bad.per_image_corr
    diff = paired_corr_difference(good, bad)
    assert diff.n == 25 and diff.mean == pytest.approx(float(d.mean()))
    assert diff.se == pytest.approx(float(d.std(unbiased=True)) / 5)
    assert good.corr_img_se == pytest.approx(float(good.per_image_corr.std()) / 5)
    assert diff.ci95()[0] > 0  # a noisy copy beats an unrelated map, paired over the same images
    assert "per_image_corr" not in good.to_dict()
