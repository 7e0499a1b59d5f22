"""The text family as the pipeline sees it: prepared tasks and zero-shot heads."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from orthoreg.errors import ConfigError
from orthoreg.heads import ZeroShotHead
from orthoreg.zoo.registry import family_of
from orthoreg.zoo.text import classnames
from orthoreg.zoo.text.classnames import ClassTableError
from orthoreg.zoo.text.family import LOGIT_SCALE

DATA = SimpleNamespace(max_train=60, max_val=12, max_test=24, split_seed=0, max_length=20)


@pytest.fixture(scope="module")
def family():
    return family_of("tiny_bert")


def test_registry_finds_the_text_family(family) -> None:
    assert family.name == "text" and family_of("all_minilm_l6_v2") is family
    assert "newsgroups" in family.tasks() and family.control == "bbc_news"


def test_prepare_gives_token_datasets_and_truncation_counts(family, tiny_encoder) -> None:
    prepared = family.prepare(tiny_encoder, "synthetic_text_a", DATA)
    ids, labels = prepared.train.tensors
    assert ids.dtype == torch.int64 and ids.shape == (60, 20) and labels.dtype == torch.int64
    assert prepared.classes == ["apple", "river", "stone"]
    assert prepared.info["truncated"] == {"train": 0, "val": 0, "test": 0}
    assert prepared.info["classnames"] == prepared.classes
    short = family.prepare(tiny_encoder, "synthetic_text_a", SimpleNamespace(**{**vars(DATA),
                                                                              "max_length": 6}))
    assert short.info["truncated"]["train"] > 0  # 6 tokens cannot hold 6–15 words
    assert short.splits != prepared.splits or short.info["truncated"]["test"] > 0


def test_zero_shot_head_is_clip_construction(family, tiny_encoder) -> None:
    prepared = family.prepare(tiny_encoder, "synthetic_text_b", DATA)
    head = family.build_head(tiny_encoder, prepared, DATA)
    assert isinstance(head, ZeroShotHead) and float(head.scale) == LOGIT_SCALE
    templates = classnames.templates_for("synthetic_text_b")
    rows = []
    for name in prepared.classes:  # by hand: normalise each prompt, average, renormalise
        prompts = tiny_encoder.embed([t.format(name) for t in templates], 64).double()
        rows.append(F.normalize(F.normalize(prompts, dim=1).mean(0), dim=0))
    torch.testing.assert_close(head.weight.double(), torch.stack(rows), rtol=0, atol=1e-6)
    assert not any(p.requires_grad for p in head.parameters())
    features = tiny_encoder(prepared.val.tensors[0])
    logits = head(features)
    torch.testing.assert_close(logits, LOGIT_SCALE * features @ head.weight.T, rtol=1e-5,
                               atol=1e-5)


def test_head_round_trips_through_a_file(family, tiny_encoder, tmp_path) -> None:
    prepared = family.prepare(tiny_encoder, "synthetic_text_b", DATA)
    head = family.build_head(tiny_encoder, prepared, DATA)
    family.save_head(head, tmp_path / "head.safetensors", {"task": "synthetic_text_b"})
    loaded = family.load_head(tmp_path / "head.safetensors")
    torch.testing.assert_close(loaded.weight, head.weight, rtol=0, atol=0)
    assert loaded.metadata["task"] == "synthetic_text_b"
    spec = family.head_spec("tiny_bert", prepared, DATA)
    assert spec["classnames"] == prepared.classes and spec["scale"] == LOGIT_SCALE


def test_a_table_missing_a_class_fails_before_tokenising(family, tiny_encoder,
                                                         monkeypatch) -> None:
    table = dict(classnames.PROMPTS["synthetic_text_a"].names)
    del table["stone"]
    monkeypatch.setitem(classnames.PROMPTS, "synthetic_text_a",
                        classnames.Prompts(table, classnames.SYNTHETIC_TEMPLATES))
    with pytest.raises(ClassTableError, match="no entry for label 'stone'"):
        family.prepare(tiny_encoder, "synthetic_text_a", DATA)


def test_class_tables_are_complete_and_distinct() -> None:
    with pytest.raises(ClassTableError, match="no class-name table"):
        classnames.classnames_for("no_such_task", ["a"])
    for task, prompts in classnames.PROMPTS.items():
        assert len(set(prompts.names.values())) == len(prompts.names), task
        assert prompts.templates and all(t.count("{}") == 1 for t in prompts.templates), task
    assert classnames.classnames_for("reuters8", ["acq", "earn"]) == [
        "corporate acquisitions", "company earnings"]


def test_max_length_beyond_the_model_is_a_config_error(family, tiny_encoder) -> None:
    data = SimpleNamespace(**{**vars(DATA), "max_length": 65})  # tiny_bert has 64 positions
    with pytest.raises(ConfigError, match=r"data\.max_length"):
        family.prepare(tiny_encoder, "synthetic_text_a", data)
