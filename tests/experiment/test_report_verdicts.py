"""The report's verdicts: paired per-seed differences and their 95 % t interval."""

from __future__ import annotations

import math
from typing import Any

import pytest

from orthoreg.experiment.report import verdicts
from orthoreg.experiment.stats import paired_difference


def _results(base: list[float], other: list[float]) -> dict[str, Any]:
    runs = [{"paradigm": "full", "variant": variant, "seed": seed, "addition": {"abs": acc}}
            for variant, accs in (("baseline", base), ("orthoreg", other))
            for seed, acc in enumerate(accs)]
    summary = [{"paradigm": "full", "variant": variant, "seeds": len(accs),
                "addition_abs": sum(accs) / len(accs), "addition_norm": 0.7,
                "negation_target": 0.5, "cosine_mean": 0.1, "vector_norm": 1.0}
               for variant, accs in (("baseline", base), ("orthoreg", other))]
    return {"runs": runs, "summary": summary}


def test_paired_difference_matches_a_hand_computation() -> None:
    paired = paired_difference(_results([0.60, 0.70, 0.65], [0.61, 0.73, 0.67])["runs"],
                               "full", "orthoreg")
    assert paired is not None
    assert paired["per_seed"] == pytest.approx([0.01, 0.03, 0.02])
    assert paired["mean"] == pytest.approx(0.02)
    assert paired["std"] == pytest.approx(0.01)
    half = 4.303 * 0.01 / math.sqrt(3)
    assert paired["ci"] == pytest.approx((0.02 - half, 0.02 + half))


def test_same_sign_in_three_seeds_is_not_enough_when_the_spread_is_wide() -> None:
    (line,) = verdicts(_results([0.60, 0.70, 0.65], [0.61, 0.73, 0.67]))
    assert "no clear difference" in line and "per seed +1.0, +3.0, +2.0" in line


def test_a_tight_paired_gain_is_called_better_and_a_loss_worse() -> None:
    (better,) = verdicts(_results([0.60, 0.70, 0.65], [0.62, 0.721, 0.669]))
    assert "OrthoReg better" in better and "95 % CI [+1." in better
    (worse,) = verdicts(_results([0.60, 0.70, 0.65], [0.58, 0.679, 0.631]))
    assert "OrthoReg worse" in worse


def test_one_seed_says_its_noise_is_unknown() -> None:
    assert paired_difference(_results([0.6], [0.7])["runs"], "full", "orthoreg") is None
    (line,) = verdicts(_results([0.6], [0.7]))
    assert "one seed, so the size of the noise is unknown" in line


def test_mechanism_paired_table_compares_the_paper_form_with_its_size_only_control() -> None:
    from orthoreg.experiment.mechanism import paired_table

    def run(variant: str, seed: int, acc: float, xi: float) -> dict[str, Any]:
        return {"paradigm": "lora", "variant": variant, "seed": seed,
                "addition": {"abs": acc}, "cosine_mean": 0.1, "xi": {"mean": xi},
                "norm_matched": {"addition": {"abs": acc - 0.01}, "xi": {"mean": xi}}}

    runs = [run("baseline", s, 0.60 + s / 100, 0.5) for s in range(3)]
    runs += [run("orthoreg", s, 0.62 + s / 100, 0.4 + s / 1000) for s in range(3)]
    runs += [run("growth", s, 0.62 + s / 100, 0.4) for s in range(3)]
    table = paired_table({"runs": runs})
    rows = {line.split(" | ")[1]: line for line in table.splitlines()[2:]}
    assert set(rows) == {"orthoreg − baseline", "growth − baseline", "orthoreg − growth"}
    assert "+2.0 [+2.0, +2.0] *" in rows["orthoreg − baseline"]  # identical gain each seed
    assert "+0.0 [+0.0, +0.0]" in rows["orthoreg − growth"]
    assert "+0.001 [" in rows["orthoreg − growth"]  # ξ: mean of 0, 0.001, 0.002
    assert paired_table({"runs": [r for r in runs if r["seed"] == 0]}) == ""
