"""The tensor helpers the methods are composed from."""

from __future__ import annotations

import torch

from orthoreg.merging.ops import (
    as_matrix,
    derived_seed,
    disjoint_mean,
    elect_sign,
    flatten_spectrum,
    kept_count,
    magnitude_threshold,
    mass_sign,
    orthogonal_procrustes,
    random_drop_rescale,
    resolve_zero_signs,
    thin_svd,
    trim_below,
    trim_top_k,
)


def test_kept_count_floors_like_peft():
    assert kept_count(10, 0.2) == 2
    assert kept_count(100, 0.29) == 28  # int(0.29·100) = int(28.999…), PEFT's count
    assert kept_count(3, 0.2) == 0  # a small bias keeps nothing, as in PEFT
    assert kept_count(7, 1.0) == 7
    assert kept_count(0, 0.5) == 0


def test_magnitude_threshold_is_the_original_codes_kth_value():
    magnitudes = torch.tensor([0.5, 1.0, 2.0, 3.0, 4.0, 0.1, 0.2, 0.3, 0.4, 0.6])
    # d = 10, density 0.2: position 10 − 2 = 8 → 8th smallest = 2.0; |τ| ≥ 2 keeps 3 entries
    assert float(magnitude_threshold(magnitudes, 0.2)) == 2.0
    assert float(magnitude_threshold(magnitudes, 1.0)) == 0.0  # keep everything
    # the flattening order does not matter
    assert float(magnitude_threshold(magnitudes.flip(0).reshape(2, 5), 0.2)) == 2.0
    kept = trim_below(torch.tensor([-3.0, 1.0, 2.0, -2.0]), 2.0)
    assert torch.equal(kept, torch.tensor([-3.0, 0.0, 2.0, -2.0]))  # ties at the threshold kept


def test_zero_sign_mass_takes_the_given_majority():
    stacked = torch.tensor([[1.0, -2.0, 0.0], [-1.0, 1.0, 0.0]])
    sign = mass_sign(stacked)
    assert torch.equal(sign, torch.tensor([0.0, -1.0, 0.0]))
    assert torch.equal(resolve_zero_signs(sign, -1.0), torch.tensor([-1.0, -1.0, -1.0]))


def test_trim_top_k_keeps_exactly_the_largest_magnitudes():
    tensor = torch.tensor([[0.1, -5.0, 0.3], [2.0, -0.2, 0.05], [-3.0, 0.4, 1.0], [0.0, 0.6, -0.7]])
    trimmed = trim_top_k(tensor, 0.25)  # 3 of 12
    expected = torch.tensor([[0.0, -5.0, 0.0], [2.0, 0.0, 0.0], [-3.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    assert torch.equal(trimmed, expected)
    assert torch.equal(tensor[0], torch.tensor([0.1, -5.0, 0.3]))  # input untouched
    full = trim_top_k(tensor, 1.0)
    assert torch.equal(full, tensor) and full.data_ptr() != tensor.data_ptr()


def test_elect_sign_follows_the_mass_not_the_head_count():
    stacked = torch.tensor([[1.0, -1.0, 2.0, 0.0], [1.0, -1.0, -2.0, 0.0], [-5.0, 3.0, 0.0, 0.0]])
    assert torch.equal(elect_sign(stacked), torch.tensor([-1.0, 1.0, 1.0, 1.0]))


def test_disjoint_mean_averages_only_the_agreeing_non_zero_values():
    stacked = torch.tensor([[2.0, 0.0, -1.0, 0.0], [4.0, -3.0, 5.0, 0.0], [-9.0, -1.0, 0.0, 0.0]])
    sign = torch.tensor([1.0, -1.0, -1.0, 1.0])
    assert torch.equal(disjoint_mean(stacked, sign), torch.tensor([3.0, -2.0, -1.0, 0.0]))
    # a zero sign selects the negative values, as the original's where(γ > 0, τ > 0, τ < 0)
    assert torch.equal(disjoint_mean(stacked, torch.zeros(4)), torch.tensor([-9.0, -2.0, -1.0,
                                                                            0.0]))


def test_random_drop_rescale_is_generator_driven():
    tensor = torch.arange(1.0, 101.0)
    draw = lambda seed: random_drop_rescale(  # noqa: E731
        tensor, 0.75, torch.Generator().manual_seed(seed)
    )
    assert torch.equal(draw(1), draw(1))
    assert not torch.equal(draw(1), draw(2))
    kept = draw(1) != 0
    torch.testing.assert_close(draw(1)[kept], tensor[kept] * 4)
    assert torch.equal(random_drop_rescale(tensor, 0.0, torch.Generator()), tensor)


def test_derived_seed_is_stable_and_separates_paths():
    assert derived_seed(0, 1, "w") == derived_seed(0, 1, "w")
    assert len({derived_seed(0, 0, "w"), derived_seed(0, 1, "w"), derived_seed(1, 0, "w"),
                derived_seed(0, 0, "b")}) == 4
    assert 0 <= derived_seed(2**40, 3, "x") < 2**63


def test_as_matrix_flattens_kernels_and_skips_vectors():
    assert as_matrix(torch.zeros(5)) is None
    assert as_matrix(torch.zeros(8, 3, 3, 3)).shape == (8, 27)
    assert as_matrix(torch.zeros(4, 6)).shape == (4, 6)
    # the references' rule: exactly 2-D tensors are matrices
    assert as_matrix(torch.zeros(8, 3, 3, 3), reshape_nd=False) is None
    assert as_matrix(torch.zeros(4, 6), reshape_nd=False).shape == (4, 6)


def test_orthogonal_procrustes_gives_the_nearest_orthonormal_basis():
    basis = torch.randn(9, 4, generator=torch.Generator().manual_seed(0))
    nearest = orthogonal_procrustes(basis)
    torch.testing.assert_close(nearest.mT @ nearest, torch.eye(4), atol=1e-5, rtol=0)
    generator = torch.Generator().manual_seed(1)
    for _ in range(20):
        candidate = torch.linalg.qr(torch.randn(9, 4, generator=generator)).Q
        assert torch.dist(basis, nearest) <= torch.dist(basis, candidate)
    already = torch.linalg.qr(basis).Q
    torch.testing.assert_close(orthogonal_procrustes(already), already, atol=1e-5, rtol=0)
    # rows work the same way: it commutes with transposition
    torch.testing.assert_close(orthogonal_procrustes(basis.mT), nearest.mT, atol=1e-5, rtol=0)


def test_flatten_spectrum_keeps_the_trace_norm():
    matrix = torch.randn(7, 5, generator=torch.Generator().manual_seed(0))
    flat = flatten_spectrum(matrix)
    spectrum = torch.linalg.svdvals(flat)
    torch.testing.assert_close(spectrum, spectrum.mean().expand(5), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(spectrum.sum(), torch.linalg.svdvals(matrix).sum())


def test_thin_svd_of_wide_and_tall_matrices():
    generator = torch.Generator().manual_seed(0)
    for shape in ((4, 9), (9, 4)):
        matrix = torch.randn(*shape, generator=generator)
        u, s, vh = thin_svd(matrix)
        assert u.shape == (shape[0], 4) and s.shape == (4,) and vh.shape == (4, shape[1])
        torch.testing.assert_close((u * s) @ vh, matrix, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(u.mT @ u, torch.eye(4), atol=1e-5, rtol=0)
        torch.testing.assert_close(vh @ vh.mT, torch.eye(4), atol=1e-5, rtol=0)
        assert torch.all(s[:-1] >= s[1:])
