"""What a training step with OrthoReg should cost, from FLOPs and bytes, without timing it.

The penalty benchmark prints these predictions beside its measurements, so that a measured
overhead reads against what the arithmetic allows rather than against a guess:

- the model step, counted layer by layer (:func:`step_flops`: forward, input gradients
  where an input needs them, weight gradients where the weight trains; ≈ 6·params·tokens
  for the full ViT), or analytically for a CLIP ViT shape (:class:`TransformerShape`);
- the exact penalty as 6·m·n·min(m, n) per matrix (2·m·n·min(m, n) forward, ×3 with
  autograd's backward: the issue's formula) and as what ours computes
  (:func:`ours_matrix_flops`): the Gram's upper blocks, (b + 1)/2b of the forward product
  (5/8 for the 768-wide ViT Grams, 4 blocks), and one product backward, 3.25·m·n·min(m, n)
  in all;
- Hutchinson's estimator by the bytes it moves (:func:`hutchinson_bytes`), since it is
  memory-bound, turned into seconds by the rate at which this machine streams the model's
  own weights (:func:`stream_bandwidth`, the one measurement here);
- the paper's setting (ViT-B/32 and ViT-L/14, 224 px, batch 128, with gradient
  accumulation), which no CPU can time: :func:`paper_setting`.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from orthoreg.paradigms.base import FineTunable
from orthoreg.regularizer import OrthoReg, as_matrix, gram_flop_factor


# ----------------------------------------------------------------------------- counted
def step_flops(model: nn.Module, head: nn.Module, image: int) -> float:
    """FLOPs of one training step per example, counted module by module.

    Forward: 2·in·out per linear output row, 2·k²·(c_in/groups)·c_out per conv output
    pixel, for attention also QKᵀ and AV (4·T²·d). Backward: the same again for the input
    gradient where the module's input requires grad, and again for the weight gradient
    where the weight trains (so a fully trained stack costs 3× its forward, 6·P·T).
    """
    total = [0.0]

    def count(forward: float, input_grad: bool, weight_grad: bool) -> None:
        total[0] += forward * (1 + int(input_grad) + int(weight_grad))

    def hook(module: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
        x = inputs[0]
        needs_input = bool(x.requires_grad)
        if isinstance(module, nn.MultiheadAttention):
            batch, tokens, width = x.shape
            rows = batch * tokens
            count(2.0 * rows * width * 3 * width, needs_input, module.in_proj_weight.requires_grad)
            attention = 4.0 * batch * tokens * tokens * width
            total[0] += attention * 3  # scores and mixing: forward + two input gradients
            count(2.0 * rows * width * width, True, module.out_proj.weight.requires_grad)
        elif isinstance(module, nn.Linear):
            count(2.0 * x.numel() / module.in_features * module.in_features * module.out_features,
                  needs_input, module.weight.requires_grad)
        elif isinstance(module, nn.Conv2d):
            out = output
            k = module.kernel_size[0] * module.kernel_size[1]
            per_pixel = 2.0 * k * module.in_channels / module.groups * module.out_channels
            count(per_pixel * out.shape[0] * out.shape[2] * out.shape[3], needs_input,
                  module.weight.requires_grad)

    handles = [m.register_forward_hook(hook) for m in [*model.modules(), *head.modules()]
               if isinstance(m, nn.Linear | nn.Conv2d | nn.MultiheadAttention)]
    try:
        x = torch.zeros(1, 3, image, image, device=next(model.parameters()).device)
        head(model(x))
    finally:
        for handle in handles:
            handle.remove()
    return total[0]


def ours_matrix_flops(m: int, n: int) -> float:
    """Exact penalty, forward + backward, as computed: upper Gram blocks, one backward product."""
    k = min(m, n)
    return (2.0 * gram_flop_factor(k) + 2.0) * m * n * k


def penalty_flops(reg: OrthoReg | None, probes: int | None, fused: bool) -> float:
    """FLOPs of one penalty forward + backward (LoRA low-rank terms: their r×r products)."""
    if reg is None:
        return 0.0
    total = 0.0
    growth = getattr(reg, "form", "paper") == "growth"
    for param in (p for group in reg._groups for p in group.params):
        m, n = as_matrix(param).shape
        if probes is not None:
            total += 10.0 * m * n * probes  # 2 thin products forward, 3 backward
        elif growth:  # no Gram: ‖ΔW‖²_F and c·ΔW
            total += 4.0 * m * n
        else:  # paper and shape (shape adds O(n²) per matrix)
            total += ours_matrix_flops(m, n) if fused else 6.0 * m * n * min(m, n)
    for term in reg.lowrank:
        r = term.A.shape[0]
        rows, cols = term.B.reshape(term.B.shape[0], -1).shape[0], term.A.reshape(r, -1).shape[1]
        total += 6.0 * (rows + cols) * r * r + 6.0 * r**3
    return total


def dense_lora_flops(model: FineTunable) -> tuple[float, float]:
    """(naive, fused) FLOPs of the dense-form LoRA penalty: merge s·B·A, then R of it."""
    naive = fused = 0.0
    for delta in model.deltas().values():
        m, n = as_matrix(delta).shape
        merge = 6.0 * m * n * 8  # rank 8: forward 2·m·n·r, backward 4·m·n·r
        naive += merge + 6.0 * m * n * min(m, n)
        fused += merge + ours_matrix_flops(m, n)
    return naive, fused


# ----------------------------------------------------------------------------- bytes
def hutchinson_bytes(reg: OrthoReg) -> float:
    """Bytes Hutchinson's :meth:`~orthoreg.regularizer.OrthoReg.accumulate_grad` moves per step.

    It is memory-bound (10·m·n·k FLOPs against m·n reads per pass), so FLOPs do not predict
    its time; bytes do. Per group, in passes over the parameters' bytes: ΔW built (W − θ0
    into the workspace: 3; no θ0: copy the weights, 2), three thin products read ΔW (3),
    the rank-2k update reads and writes ``.grad`` (2). Any implementation moves at least 4
    (read W and θ0, update ``.grad``).
    """
    total = 0.0
    for group in reg._groups:
        size = sum(p.numel() * p.element_size() for p in group.params)
        build = 2 if group.references is None else 3
        total += (build + 3 + 2) * size
    return total


def stream_bandwidth(reg: OrthoReg) -> float:
    """Bytes per second of ΔW = W − θ0 written into a buffer, on the largest group's own weights.

    A synthetic copy of fresh tensors read anywhere from 40 to 78 GB/s on the development box
    from one process to the next (whether the allocation got huge pages, presumably); the
    penalty streams the model's own weights, so their streaming rate is the fair yardstick.
    Three passes (read W, read θ0, write ΔW) per timing; the median of 7 after one warm-up.
    """
    group = max((g for g in reg._groups if g.references is not None),
                key=lambda g: sum(p.numel() for p in g.params))
    weights = [as_matrix(p.detach()) for p in group.params]
    out = torch.empty((len(weights), *weights[0].shape), dtype=weights[0].dtype,
                      device=weights[0].device)
    times = []
    for _ in range(8):
        if out.device.type == "cuda":
            torch.cuda.synchronize(out.device)
        started = time.perf_counter()
        for index, (weight, ref) in enumerate(zip(weights, group.references)):
            torch.sub(weight, ref, out=out[index])
        if out.device.type == "cuda":
            torch.cuda.synchronize(out.device)
        times.append(time.perf_counter() - started)
    return 3 * out.numel() * out.element_size() / statistics.median(times[1:])


# ----------------------------------------------------------------------------- analytic
@dataclass(frozen=True)
class TransformerShape:
    """A CLIP ViT image tower, enough to count its FLOPs without building it."""

    name: str
    width: int
    layers: int
    mlp: int
    patch: int
    image: int = 224
    output_dim: int = 512

    @property
    def tokens(self) -> int:
        return (self.image // self.patch) ** 2 + 1

    def matrices(self, attention_only: bool = False) -> list[tuple[int, int]]:
        """(m, n) of every matrix the penalty sees, in full or attention-only fine-tuning."""
        w = self.width
        per_layer = [(3 * w, w), (w, w)] + (
            [] if attention_only else [(self.mlp, w), (w, self.mlp)])
        extra = [] if attention_only else [
            (w, 3 * self.patch**2), (self.tokens, w), (w, self.output_dim)]
        return per_layer * self.layers + extra

    def step_flops(self, attention_only: bool = False) -> float:
        """FLOPs per example: forward, input gradients (none into the image), and the weight
        gradients of what trains (everything, or the attention projections alone)."""
        w, t = self.width, self.tokens
        block = 2.0 * t * sum(m * n for m, n in self.matrices()[:4])  # one layer's matmuls
        attn_weights = 2.0 * t * (4 * w * w)
        scores = 4.0 * t * t * w
        patch = 2.0 * (t - 1) * w * 3 * self.patch**2
        head = 2.0 * w * self.output_dim
        forward = self.layers * (block + scores) + patch + head
        if attention_only:  # nothing before block 0 trains: the patch conv runs forward only
            return 2 * (forward - patch) + patch + self.layers * attn_weights
        return 3 * forward - patch  # no gradient into the image


VIT_B32 = TransformerShape("ViT-B/32", 768, 12, 3072, 32)
VIT_L14 = TransformerShape("ViT-L/14", 1024, 24, 4096, 14, output_dim=768)


def predicted_ratios(shape: TransformerShape, batch: int, probes: int) -> list[dict[str, Any]]:
    """Step ratios from FLOPs for a batch split into K micro-batches (penalty per micro-batch
    as the authors' code does, or once per optimizer step as ours does)."""
    full, attn = shape.step_flops() * batch, shape.step_flops(attention_only=True) * batch

    def cost(mats: list[tuple[int, int]], per_matrix: Callable[[int, int], float]) -> float:
        return sum(per_matrix(m, n) for m, n in mats)

    issue = cost(shape.matrices(), lambda m, n: 6.0 * m * n * min(m, n))
    ours = cost(shape.matrices(), ours_matrix_flops)
    hutch = cost(shape.matrices(), lambda m, n: 10.0 * m * n * probes)
    attn_issue = cost(shape.matrices(True), lambda m, n: 6.0 * m * n * min(m, n))
    attn_ours = cost(shape.matrices(True), ours_matrix_flops)
    return [{
        "model": shape.name, "tokens": shape.tokens, "batch": batch, "accumulation": k,
        "micro_batch": batch // k,
        "per_micro_batch_issue_formula": 1 + k * issue / full,
        "once_per_step_issue_formula": 1 + issue / full,
        "once_per_step_ours": 1 + ours / full,
        "once_per_step_hutchinson": 1 + hutch / full,
        "attention_only_issue_formula": 1 + attn_issue / attn,
        "attention_only_ours": 1 + attn_ours / attn,
    } for k in (1, 2, 4, 8)]


def paper_setting(probes: int) -> list[dict[str, Any]]:
    """:func:`predicted_ratios` at the paper's batch 128, for ViT-B/32 and ViT-L/14."""
    return [*predicted_ratios(VIT_B32, 128, probes), *predicted_ratios(VIT_L14, 128, probes)]
