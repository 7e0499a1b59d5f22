"""Cosines, R(ΔW), spectra and column angles against numpy; the angle histogram of an
orthogonal matrix peaks at 90°."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from orthoreg.diagnostics import (
    alignment_by_parameter,
    angle_histogram,
    column_angles,
    cosine_matrix,
    effective_rank,
    layer_cosines,
    layer_penalties,
    matrices,
    orthogonality_report,
    singular_values,
    vector_angles,
)
from orthoreg.taskvector import TaskVector


def vector(seed: int) -> TaskVector:
    generator = torch.Generator().manual_seed(seed)
    return TaskVector({
        "conv.weight": torch.randn(6, 3, 3, 3, generator=generator),  # (6, 27): wide
        "fc.weight": torch.randn(10, 4, generator=generator),  # tall
        "fc.bias": torch.randn(10, generator=generator),  # not a matrix
        "bn.weight": torch.randn(6, 1, generator=generator),  # normalisation: excluded
    }, {"paradigm": "full"})


def flat(v: TaskVector) -> np.ndarray:
    return np.concatenate([t.numpy().ravel().astype(np.float64) for t in v.values()])


def test_cosine_matrix_against_numpy() -> None:
    vectors = [vector(0), vector(1), vector(2)]
    ours = np.array(cosine_matrix(vectors))
    arrays = [flat(v) for v in vectors]
    expected = np.array([[a @ b / (np.linalg.norm(a) * np.linalg.norm(b)) for b in arrays]
                         for a in arrays])
    np.testing.assert_allclose(ours, expected, rtol=1e-10, atol=1e-12)
    per_layer = layer_cosines(vectors[0], vectors[1])
    a = vectors[0]["fc.weight"].numpy().ravel().astype(np.float64)
    b = vectors[1]["fc.weight"].numpy().ravel().astype(np.float64)
    assert math.isclose(per_layer["fc.weight"], a @ b / np.linalg.norm(a) / np.linalg.norm(b),
                        rel_tol=1e-10)
    assert set(per_layer) == set(vectors[0])


def test_alignment_by_parameter_against_numpy() -> None:
    vectors = [vector(0), vector(1), vector(2)]
    shares = alignment_by_parameter(vectors)
    arrays = [flat(v) for v in vectors]
    total_square = sum(a @ a for a in arrays)
    total_dot = sum(arrays[i] @ arrays[j] for i in range(3) for j in range(i + 1, 3))
    for name in vectors[0]:
        parts = [v[name].numpy().ravel().astype(np.float64) for v in vectors]
        dots = [parts[i] @ parts[j] for i in range(3) for j in range(i + 1, 3)]
        cosines = [parts[i] @ parts[j] / np.linalg.norm(parts[i]) / np.linalg.norm(parts[j])
                   for i in range(3) for j in range(i + 1, 3)]
        assert math.isclose(shares[name]["norm_share"], sum(p @ p for p in parts) / total_square,
                            rel_tol=1e-10)
        assert math.isclose(shares[name]["dot_share"], sum(dots) / total_dot, rel_tol=1e-9)
        assert math.isclose(shares[name]["cosine"], float(np.mean(cosines)), rel_tol=1e-9)
    assert math.isclose(sum(s["norm_share"] for s in shares.values()), 1.0, rel_tol=1e-12)
    assert math.isclose(sum(s["dot_share"] for s in shares.values()), 1.0, rel_tol=1e-9)


def test_alignment_by_parameter_finds_the_shared_tensor() -> None:
    """Independent random updates plus one tensor every task moves the same way (the
    embedding artefact of the text benchmark): that tensor carries the alignment."""
    generator = torch.Generator().manual_seed(0)
    shared = torch.randn(50, 8, generator=generator)
    vectors = [TaskVector({"emb.weight": shared + 0.1 * torch.randn(50, 8, generator=generator),
                           "fc.weight": torch.randn(20, 20, generator=generator)})
               for _ in range(4)]
    shares = alignment_by_parameter(vectors)
    assert shares["emb.weight"]["dot_share"] > 0.95
    assert shares["emb.weight"]["cosine"] > 0.95
    assert abs(shares["fc.weight"]["cosine"]) < 0.2
    with pytest.raises(ValueError, match="at least 2"):
        alignment_by_parameter(vectors[:1])


def test_matrices_are_the_penalised_tensors_with_convs_flattened() -> None:
    found = matrices(vector(0))
    assert list(found) == ["conv.weight", "fc.weight"]
    assert found["conv.weight"].shape == (6, 27)


def smaller_gram_penalty(matrix: np.ndarray) -> float:
    gram = matrix.T @ matrix if matrix.shape[0] >= matrix.shape[1] else matrix @ matrix.T
    return float(np.linalg.norm(gram - np.eye(gram.shape[0]), "fro"))


def test_penalties_and_spectra_against_numpy() -> None:
    v = vector(3)
    penalties = layer_penalties(v)
    spectra = singular_values(v)
    for name in ("conv.weight", "fc.weight"):
        matrix = v[name].numpy().astype(np.float64).reshape(v[name].shape[0], -1)
        assert math.isclose(penalties[name], smaller_gram_penalty(matrix), rel_tol=1e-9)
        np.testing.assert_allclose(spectra[name].numpy(), np.linalg.svd(matrix, compute_uv=False),
                                   rtol=1e-10)
        # the penalty seen through the spectrum: ‖G − I‖²_F = Σ (σ² − 1)²
        assert math.isclose(penalties[name] ** 2,
                            float(((spectra[name] ** 2 - 1) ** 2).sum()), rel_tol=1e-9)
    squared = layer_penalties(v, squared=True)
    assert math.isclose(squared["fc.weight"], penalties["fc.weight"] ** 2, rel_tol=1e-9)


def test_report_summarises_each_layer() -> None:
    report = orthogonality_report(vector(4))
    assert set(report["layers"]) == {"conv.weight", "fc.weight"}
    layer = report["layers"]["fc.weight"]
    assert layer["size"] == 4 and math.isclose(layer["penalty"], layer["penalty_from_spectrum"],
                                               rel_tol=1e-9)
    assert math.isclose(report["penalty_total"],
                        sum(v["penalty"] for v in report["layers"].values()))


def test_column_angles_against_numpy() -> None:
    generator = torch.Generator().manual_seed(5)
    weight = torch.randn(8, 5, generator=generator)
    ours = column_angles(weight)
    w = weight.numpy().astype(np.float64)
    unit = w / np.linalg.norm(w, axis=0)
    expected = [math.degrees(math.acos(np.clip(unit[:, i] @ unit[:, j], -1, 1)))
                for i in range(5) for j in range(i + 1, 5)]
    np.testing.assert_allclose(ours.numpy(), expected, rtol=1e-9, atol=1e-9)


def test_orthogonal_matrix_histogram_peaks_at_90_degrees() -> None:
    q, _ = torch.linalg.qr(torch.randn(32, 32, generator=torch.Generator().manual_seed(6),
                                       dtype=torch.float64))
    angles = column_angles(3.0 * q)  # scale does not change angles
    assert angles.numel() == 32 * 31 // 2
    assert torch.allclose(angles, torch.full_like(angles, 90.0), atol=1e-6)
    hist = angle_histogram(angles)
    peak = int(np.argmax(hist["density"]))
    assert hist["edges"][peak] <= 90.0 <= hist["edges"][peak + 1]
    assert hist["mean_abs_deviation_from_90"] < 1e-6
    width = hist["edges"][1] - hist["edges"][0]
    assert math.isclose(sum(hist["density"]) * width, 1.0)


def test_low_rank_update_has_parallel_columns() -> None:
    """The baseline's picture: a rank-one ΔW has all columns at 0° or 180°."""
    generator = torch.Generator().manual_seed(7)
    rank_one = torch.outer(torch.randn(12, generator=generator), torch.randn(6, generator=generator))
    angles = column_angles(rank_one)
    assert torch.all((angles < 1e-4) | (angles > 180 - 1e-4))
    assert math.isclose(effective_rank(torch.linalg.svdvals(rank_one.double())), 1.0,
                        rel_tol=1e-6)
    assert math.isclose(effective_rank(torch.ones(7, dtype=torch.float64)), 7.0)


def test_angle_axis_and_zero_columns() -> None:
    wide = torch.randn(3, 10, generator=torch.Generator().manual_seed(8))
    assert column_angles(wide).numel() == 3  # auto: the 3 rows (the smaller Gram)
    assert column_angles(wide, "columns").numel() == 45
    with_zero = torch.randn(6, 4, generator=torch.Generator().manual_seed(9))
    with_zero[:, 2] = 0.0
    assert column_angles(with_zero).numel() == 3  # the zero column has no direction
    with pytest.raises(ValueError, match="axis"):
        column_angles(wide, "diagonal")
    pooled = vector_angles(vector(10))
    assert pooled.numel() == 6 * 5 // 2 + 4 * 3 // 2  # conv (6 rows) + fc (4 columns)


def test_cli_info_by_parameter(tmp_path, capsys) -> None:
    from orthoreg.cli import main

    paths = [str(vector(seed).save(tmp_path / f"t{seed}.safetensors")) for seed in range(2)]
    assert main(["info", *paths, "--by-parameter", "2"]) == 0
    out = capsys.readouterr().out
    assert "share of Σ‖τ‖²" in out and "share of Σ pairwise dot" in out
    shares = alignment_by_parameter([vector(0), vector(1)])
    top = max(shares, key=lambda n: shares[n]["norm_share"])
    assert f"{top}" in out.split("share of Σ‖τ‖²")[1].splitlines()[1]
    assert main(["info", paths[0], "--by-parameter", "2"]) == 2
    assert "at least 2" in capsys.readouterr().err
