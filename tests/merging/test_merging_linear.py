"""Task arithmetic: Σ_t w_t·τ_t."""

from __future__ import annotations

import torch

from orthoreg import merging
from orthoreg.taskvector import TaskVector


def test_single_vector_merges_to_itself_as_a_fresh_copy():
    tau = TaskVector({"w": torch.tensor([[1.0, -2.0], [3.0, 0.5]]), "b": torch.tensor([0.25])})
    merged = merging.task_arithmetic([tau])
    assert merged.keys() == tau.keys()
    for name in tau:
        assert torch.equal(merged[name], tau[name])
    merged["w"].add_(1.0)  # the result must not alias the input
    assert torch.equal(tau["w"], torch.tensor([[1.0, -2.0], [3.0, 0.5]]))


def test_two_vectors_merge_to_the_hand_sum():
    tau_a = TaskVector({"w": torch.tensor([[1.0, -2.0], [3.0, 0.5]]), "b": torch.tensor([0.25])})
    tau_b = TaskVector({"w": torch.tensor([[0.5, 2.0], [-1.0, 1.5]]), "b": torch.tensor([-1.0])})
    merged = merging.merge("task_arithmetic", [tau_a, tau_b])
    assert torch.equal(merged["w"], torch.tensor([[1.5, 0.0], [2.0, 2.0]]))
    assert torch.equal(merged["b"], torch.tensor([-0.75]))


def test_weights_scale_each_vector():
    tau_a = TaskVector({"w": torch.tensor([2.0, 4.0])})
    tau_b = TaskVector({"w": torch.tensor([1.0, -1.0])})
    merged = merging.task_arithmetic([tau_a, tau_b], weights=[0.5, -2.0])
    assert torch.equal(merged["w"], torch.tensor([-1.0, 4.0]))


def test_half_precision_is_accumulated_in_float32_and_returned_in_its_dtype():
    # 1 + 100·(2⁻⁹) in bf16 one step at a time stays at 1 (spacing at 1 is 2⁻⁷)
    vectors = [TaskVector({"w": torch.tensor([1.0], dtype=torch.bfloat16)})]
    vectors += [TaskVector({"w": torch.tensor([2.0**-9], dtype=torch.bfloat16)})] * 100
    merged = merging.task_arithmetic(vectors)
    assert merged["w"].dtype == torch.bfloat16
    assert float(merged["w"]) == float(torch.tensor(1.0 + 100 * 2.0**-9).bfloat16())
