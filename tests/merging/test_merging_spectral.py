"""TSV-M and Iso-C: the spectra and subspaces of the merged matrices."""

from __future__ import annotations

import pytest
import torch

from orthoreg import merging
from orthoreg.taskvector import TaskVector


def randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def orthonormal(size: int, seed: int) -> torch.Tensor:
    return torch.linalg.qr(randn(size, size, seed=seed)).Q


def projector(basis: torch.Tensor) -> torch.Tensor:
    return basis @ basis.mT


def singular_values(matrix: torch.Tensor) -> torch.Tensor:
    return torch.linalg.svdvals(matrix.double())


# --------------------------------------------------------------------- TSV
@pytest.mark.parametrize("nd_tensors", ["nonmatrix", "reshape"])
def test_tsv_of_one_task_at_full_rank_reproduces_it(nd_tensors):
    tau = TaskVector({
        "w": randn(7, 5, seed=0),
        "conv": randn(4, 3, 3, 3, seed=1),
        "depthwise": randn(6, 1, 3, 3, seed=2),
        "b": randn(7, seed=3),
    })
    merged = merging.tsv([tau], nd_tensors=nd_tensors)
    for name in tau:
        assert merged[name].shape == tau[name].shape
        torch.testing.assert_close(merged[name], tau[name], atol=1e-5, rtol=1e-5)


def test_tsv_of_tasks_with_orthogonal_subspaces_is_their_sum():
    # rank-4 tasks in disjoint halves of the column and of the row space of an 8x8 layer:
    # nothing to decorrelate, and the per-task rank 8/2 = 4 truncates nothing
    left, right = orthonormal(8, seed=0), orthonormal(8, seed=1)
    task_a = left[:, :4] @ torch.diag(torch.tensor([5.0, 3.0, 2.0, 1.0])) @ right[:, :4].mT
    task_b = left[:, 4:] @ torch.diag(torch.tensor([4.0, 2.5, 0.5, 0.1])) @ right[:, 4:].mT
    merged = merging.tsv([TaskVector({"w": task_a}), TaskVector({"w": task_b})])
    torch.testing.assert_close(merged["w"], task_a + task_b, atol=1e-5, rtol=1e-5)


def test_tsv_spectrum_is_the_union_of_each_tasks_top_singular_values():
    # 3 tasks on a 12x9 layer: each keeps its top 9 // 3 = 3 singular values; after
    # orthogonalising U and V those 9 values are exactly the merged spectrum
    tasks = [randn(12, 9, seed=seed) for seed in range(3)]
    merged = merging.tsv([TaskVector({"w": task}) for task in tasks])["w"]
    expected = torch.cat([singular_values(task)[:3] for task in tasks]).sort(descending=True)
    torch.testing.assert_close(singular_values(merged), expected.values, atol=1e-4, rtol=1e-4)


def test_tsv_rank_fraction_and_nonmatrix_options():
    tasks = [TaskVector({"w": randn(6, 6, seed=s), "b": randn(6, seed=10 + s)}) for s in range(2)]
    merged = merging.tsv(tasks, rank_fraction=1 / 6)  # one singular triplet per task
    assert int(torch.linalg.matrix_rank(merged["w"])) == 2
    torch.testing.assert_close(merged["b"], (tasks[0]["b"] + tasks[1]["b"]) / 2)
    summed = merging.tsv(tasks, nonmatrix="sum")
    torch.testing.assert_close(summed["b"], tasks[0]["b"] + tasks[1]["b"])


def test_tsv_keeps_at_least_one_direction_per_task_in_narrow_layers():
    # min(m, n) = 2 < T = 3: the authors' floor(2/3) = 0 would zero the layer
    tasks = [TaskVector({"w": randn(2, 5, seed=s)}) for s in range(3)]
    assert torch.linalg.matrix_norm(merging.tsv(tasks)["w"]) > 0


@pytest.mark.parametrize("name", ["tsv", "iso_c"])
def test_spectral_methods_keep_half_precision_dtype(name):
    tasks = [TaskVector({"w": randn(6, 4, seed=s).bfloat16(), "b": randn(6, seed=s).bfloat16()})
             for s in range(2)]
    merged = merging.merge(name, tasks)
    assert merged["w"].dtype == torch.bfloat16 and merged["b"].dtype == torch.bfloat16


# --------------------------------------------------------------------- Iso-C
def test_iso_c_flattens_the_spectrum_of_the_sum_to_its_mean():
    tasks = [randn(10, 6, seed=seed) for seed in range(3)]
    merged = merging.iso_c([TaskVector({"w": task}) for task in tasks])["w"]
    total = sum(tasks)
    mean = singular_values(total).mean()
    torch.testing.assert_close(singular_values(merged), mean.expand(6), atol=1e-4, rtol=1e-4)


def test_iso_c_keeps_the_singular_subspaces_of_the_sum():
    tasks = [randn(10, 6, seed=seed) for seed in range(3)]
    merged = merging.iso_c([TaskVector({"w": task}) for task in tasks])["w"]
    u_sum, _, vh_sum = torch.linalg.svd(sum(tasks), full_matrices=False)
    u_merged, _, vh_merged = torch.linalg.svd(merged, full_matrices=False)
    torch.testing.assert_close(projector(u_merged), projector(u_sum), atol=1e-4, rtol=0)
    torch.testing.assert_close(projector(vh_merged.mT), projector(vh_sum.mT), atol=1e-4, rtol=0)
    # and is σ̄·U Vᵀ, so it is not the sum itself (whose spectrum is not flat)
    assert not torch.allclose(merged, sum(tasks), atol=1e-2)


def test_iso_c_of_an_already_isotropic_update_changes_nothing():
    scaled_rotation = 0.3 * orthonormal(5, seed=4)
    merged = merging.iso_c([TaskVector({"w": scaled_rotation})])
    torch.testing.assert_close(merged["w"], scaled_rotation, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("name", ["tsv", "iso_c"])
def test_spectral_methods_average_4d_tensors_like_the_references(name):
    # the references' rule is len(shape) == 2: a conv kernel (a ViT's patch embedding) is
    # averaged, not merged spectrally; 2-D matrices are still merged spectrally
    tasks = [TaskVector({"visual.conv1.weight": randn(8, 3, 4, 4, seed=s),
                         "w": randn(6, 5, seed=20 + s)}) for s in range(3)]
    merged = merging.merge(name, tasks)
    average = sum(task["visual.conv1.weight"] for task in tasks) / 3
    torch.testing.assert_close(merged["visual.conv1.weight"], average, atol=1e-6, rtol=0)
    assert not torch.allclose(merged["w"], sum(task["w"] for task in tasks) / 3, atol=1e-3)
    summed = merging.merge(name, tasks, nonmatrix="sum")
    torch.testing.assert_close(summed["visual.conv1.weight"], 3 * average, atol=1e-5, rtol=0)
    reshaped = merging.merge(name, tasks, nd_tensors="reshape")
    assert not torch.allclose(reshaped["visual.conv1.weight"], average, atol=1e-3)


def test_iso_c_reshapes_conv_kernels_on_request_and_averages_or_sums_biases():
    tasks = [TaskVector({"conv": randn(4, 2, 3, 3, seed=s), "b": randn(4, seed=10 + s)})
             for s in range(2)]
    merged = merging.iso_c(tasks, nd_tensors="reshape")
    assert merged["conv"].shape == (4, 2, 3, 3)
    spectrum = singular_values(merged["conv"].reshape(4, -1))
    torch.testing.assert_close(spectrum, spectrum.mean().expand(4), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(merged["b"], (tasks[0]["b"] + tasks[1]["b"]) / 2)
    summed = merging.iso_c(tasks, nonmatrix="sum")
    torch.testing.assert_close(summed["b"], tasks[0]["b"] + tasks[1]["b"])
