"""TIES and DARE against hand computations and their statistical promises."""

from __future__ import annotations

import pytest
import torch

from orthoreg import merging
from orthoreg.taskvector import TaskVector

# three tasks, one 5-entry tensor; density 0.4 keeps the 2 largest magnitudes of each
TAU_1 = [3.0, -1.0, 0.5, -4.0, 2.0]   # keeps 3 (0), -4 (3)
TAU_2 = [-2.0, 5.0, -0.1, 1.0, 0.2]   # keeps -2 (0), 5 (1)
TAU_3 = [4.0, -6.0, 0.3, 2.0, -3.5]   # keeps 4 (0), -6 (1)


def hand_vectors() -> list[TaskVector]:
    return [TaskVector({"v": torch.tensor(values)}) for values in (TAU_1, TAU_2, TAU_3)]


def random_vectors(num_tasks: int, seed: int = 0) -> list[TaskVector]:
    generator = torch.Generator().manual_seed(seed)
    return [
        TaskVector({
            "w": torch.randn(6, 5, generator=generator),
            "conv": torch.randn(3, 2, 3, 3, generator=generator),
            "b": torch.randn(6, generator=generator),
        })
        for _ in range(num_tasks)
    ]


def test_ties_per_tensor_matches_a_hand_computation():
    # PEFT's count ⌊0.4·5⌋ = 2: [3,0,0,-4,0], [-2,5,0,0,0], [4,-6,0,0,0];
    # mass [5,-1,0,-4,0] -> signs [+,-,+,-,+]
    # entry 0: mean of the agreeing 3 and 4 (the dissenting -2 is left out) = 3.5
    # entry 1: only -6 agrees; entry 2: all trimmed; entry 3: -4; entry 4: all trimmed
    merged = merging.ties(hand_vectors(), density=0.4, trim="per_tensor")
    assert torch.equal(merged["v"], torch.tensor([3.5, -6.0, 0.0, -4.0, 0.0]))


def test_ties_global_matches_a_hand_computation_of_the_original_rule():
    # the original keeps |τ| ≥ the (d − ⌊d·k⌋)-th smallest magnitude: d = 5, k = 0.4 → the
    # 3rd smallest, i.e. the top ⌊d·k⌋ + 1 = 3 entries of each task:
    #   τ1 |·| 0.5 1 2 3 4 → ≥ 2: [3, 0, 0, -4, 2]
    #   τ2 |·| 0.1 0.2 1 2 5 → ≥ 1: [-2, 5, 0, 1, 0]
    #   τ3 |·| 0.3 2 3.5 4 6 → ≥ 3.5: [4, -6, 0, 0, -3.5]
    # mass [5, -1, 0, -3, -1.5] → signs [+, -, 0, -, -]; the zero takes the majority
    # sgn(1 − 1 − 1 − 1) = −1 (entry 2 holds only zeros either way)
    merged = merging.ties(hand_vectors(), density=0.4)
    assert torch.equal(merged["v"], torch.tensor([3.5, -6.0, 0.0, -4.0, -3.5]))


def original_ties(vectors: list[TaskVector], density: float) -> dict[str, torch.Tensor]:
    """The original code's steps on the flattened (T, d) matrix, written out independently."""
    names = list(vectors[0])
    flat = torch.stack([torch.cat([v[n].reshape(-1) for n in names]) for v in vectors])
    d = flat.shape[1]
    kth = flat.abs().kthvalue(d - int(d * density), dim=1, keepdim=True).values
    trimmed = flat * (flat.abs() >= kth)
    sign = torch.sign(trimmed.sum(dim=0))
    sign[sign == 0] = torch.sign(sign.sum())
    keep = torch.where(sign.unsqueeze(0) > 0, trimmed > 0, trimmed < 0)
    selected = trimmed * keep
    merged = selected.sum(dim=0) / (selected != 0).sum(dim=0).float().clamp(min=1)
    out, offset = {}, 0
    for name in names:
        size = vectors[0][name].numel()
        out[name] = merged[offset:offset + size].reshape(vectors[0][name].shape)
        offset += size
    return out


def test_ties_global_trims_the_whole_vector_like_the_original_code():
    vectors = random_vectors(3, seed=4)
    # one layer ten times larger than the others takes the trim budget (per tensor it would
    # keep its own 20 % and no more)
    for vector in vectors:
        vector.tensors["w"] = vector["w"] * 10
    merged = merging.ties(vectors, density=0.2)
    reference = original_ties(vectors, 0.2)
    for name in reference:
        torch.testing.assert_close(merged[name], reference[name], atol=1e-6, rtol=0)
    per_tensor = merging.ties(vectors, density=0.2, trim="per_tensor")
    assert int((merged["w"] != 0).sum()) > int((per_tensor["w"] != 0).sum())
    assert int((merged["b"] != 0).sum()) < int((per_tensor["b"] != 0).sum())


def test_ties_per_tensor_equals_peft_merge_utils():
    merge_utils = pytest.importorskip("peft.utils.merge_utils")
    generator = torch.Generator().manual_seed(3)
    shapes = {"w": (12, 10), "conv": (4, 3, 3, 3), "b": (12,), "tiny": (3,)}
    vectors = [TaskVector({n: torch.randn(*s, generator=generator) for n, s in shapes.items()})
               for _ in range(4)]
    for density in (0.2, 0.29, 0.5, 1.0):
        merged = merging.ties(vectors, density=density, trim="per_tensor")
        for name in shapes:
            expected = merge_utils.ties([v[name] for v in vectors], torch.ones(4), density)
            torch.testing.assert_close(merged[name], expected, atol=1e-6, rtol=0)
    # ⌊0.2·3⌋ = 0: PEFT trims a 3-entry tensor away completely, and so do we
    assert torch.count_nonzero(merging.ties(vectors, density=0.2, trim="per_tensor")["tiny"]) == 0


@pytest.mark.parametrize("trim", ["global", "per_tensor"])
def test_ties_with_full_density_is_sign_consensus_without_trimming(trim):
    # mass [5, -2, 0.7, -1, -1.3] -> signs [+, -, +, -, -]
    expected = torch.tensor([(3.0 + 4.0) / 2, (-1.0 - 6.0) / 2, (0.5 + 0.3) / 2, -4.0, -3.5])
    merged = merging.ties(hand_vectors(), density=1.0, trim=trim)
    torch.testing.assert_close(merged["v"], expected)


def test_ties_trims_per_tensor_and_keeps_shapes():
    vectors = random_vectors(1)
    merged = merging.ties(vectors, density=0.2, trim="per_tensor")
    for name, tensor in vectors[0].items():
        assert merged[name].shape == tensor.shape
        kept = merged[name] != 0
        assert int(kept.sum()) == int(0.2 * tensor.numel())
        # a single task agrees with itself: the kept entries are unchanged, and they are
        # the largest in magnitude
        assert torch.equal(merged[name][kept], tensor[kept])
        assert tensor[kept].abs().min() >= tensor[~kept].abs().max()


def test_dare_states_the_papers_drop_rate_next_to_its_default():
    assert merging.get("dare").defaults["drop_rate"] == 0.5
    assert merging.paper_params("dare") == {"drop_rate": 0.9}
    assert merging.paper_params("dare_ties") == {"drop_rate": 0.9}
    assert "paper: drop_rate=0.9" in merging.get("dare").describe()


def test_dare_without_dropping_is_task_arithmetic():
    vectors = random_vectors(3)
    merged = merging.dare(vectors, drop_rate=0.0, seed=3)
    plain = merging.task_arithmetic(vectors)
    for name in plain:
        assert torch.equal(merged[name], plain[name])


def test_dare_ties_without_dropping_is_ties_without_trimming():
    vectors = random_vectors(3)
    merged = merging.dare_ties(vectors, drop_rate=0.0)
    reference = merging.ties(vectors, density=1.0, trim="per_tensor")
    for name in reference:
        assert torch.equal(merged[name], reference[name])


def test_dare_keeps_a_one_minus_p_fraction_rescaled_by_one_over_one_minus_p():
    tau = TaskVector({"w": torch.linspace(1.0, 2.0, 20_000)})
    merged = merging.dare([tau], drop_rate=0.9, seed=11)["w"]
    kept = merged != 0
    assert abs(float(kept.float().mean()) - 0.1) < 0.01
    torch.testing.assert_close(merged[kept], tau["w"][kept] / (1 - 0.9))


def test_dare_preserves_the_expectation_of_the_sum():
    vectors = random_vectors(2)
    target = merging.task_arithmetic(vectors)
    draws = 1000
    mean = {name: torch.zeros_like(tensor) for name, tensor in target.items()}
    for seed in range(draws):
        for name, tensor in merging.dare(vectors, drop_rate=0.5, seed=seed).items():
            mean[name] += tensor / draws
    for name in target:
        # per entry the estimate has std ≈ sqrt(Σ_t τ_t²/draws) ≈ 0.045 here
        torch.testing.assert_close(mean[name], target[name], atol=0.25, rtol=0)
        assert not torch.equal(mean[name], target[name])


def test_dare_is_reproducible_per_seed_and_independent_of_key_order():
    vectors = random_vectors(2)
    first = merging.dare(vectors, seed=5)
    again = merging.dare(vectors, seed=5)
    other = merging.dare(vectors, seed=6)
    reordered = merging.dare(
        [TaskVector(dict(reversed(list(v.items())))) for v in vectors], seed=5
    )
    for name in first:
        assert torch.equal(first[name], again[name])
        assert torch.equal(first[name], reordered[name])
        assert not torch.equal(first[name], other[name])
    ties_first = merging.dare_ties(vectors, seed=5)
    ties_again = merging.dare_ties(vectors, seed=5)
    for name in ties_first:
        assert torch.equal(ties_first[name], ties_again[name])
