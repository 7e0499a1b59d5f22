"""TIES and DARE against hand computations and their statistical promises."""

from __future__ import annotations

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


def test_ties_matches_a_hand_computation():
    # trimmed: [3,0,0,-4,0], [-2,5,0,0,0], [4,-6,0,0,0]; mass [5,-1,0,-4,0] -> signs [+,-,+,-,+]
    # entry 0: mean of the agreeing 3 and 4 (the dissenting -2 is left out) = 3.5
    # entry 1: only -6 agrees; entry 2: all trimmed; entry 3: -4; entry 4: all trimmed
    merged = merging.ties(hand_vectors(), density=0.4)
    assert torch.equal(merged["v"], torch.tensor([3.5, -6.0, 0.0, -4.0, 0.0]))


def test_ties_with_full_density_is_sign_consensus_without_trimming():
    # mass [5, -2, 0.7, -1, -1.3] -> signs [+, -, +, -, -]
    expected = torch.tensor([(3.0 + 4.0) / 2, (-1.0 - 6.0) / 2, (0.5 + 0.3) / 2, -4.0, -3.5])
    merged = merging.ties(hand_vectors(), density=1.0)
    torch.testing.assert_close(merged["v"], expected)


def test_ties_trims_per_tensor_and_keeps_shapes():
    vectors = random_vectors(1)
    merged = merging.ties(vectors, density=0.2)
    for name, tensor in vectors[0].items():
        assert merged[name].shape == tensor.shape
        kept = merged[name] != 0
        assert int(kept.sum()) == round(0.2 * tensor.numel())
        # a single task agrees with itself: the kept entries are unchanged, and they are
        # the largest in magnitude
        assert torch.equal(merged[name][kept], tensor[kept])
        assert tensor[kept].abs().min() >= tensor[~kept].abs().max()


def test_dare_without_dropping_is_task_arithmetic():
    vectors = random_vectors(3)
    merged = merging.dare(vectors, drop_rate=0.0, seed=3)
    plain = merging.task_arithmetic(vectors)
    for name in plain:
        assert torch.equal(merged[name], plain[name])


def test_dare_ties_without_dropping_is_ties_without_trimming():
    vectors = random_vectors(3)
    merged = merging.dare_ties(vectors, drop_rate=0.0)
    reference = merging.ties(vectors, density=1.0)
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
