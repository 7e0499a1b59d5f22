"""Prompt templates, class-name resolution and recipe presets (pure data: no open_clip)."""

from __future__ import annotations

import pytest

from orthoreg.clip.recipe import (
    PARADIGM_RECIPES,
    batch_preset,
    build_paradigm,
    recipe_steps,
    train_config,
)
from orthoreg.clip.templates import (
    DATASETS,
    PAPER_TASKS,
    base_task_name,
    dataset_spec,
    parse_classnames_file,
    resolve_classnames,
    unknown_folders,
)


def test_every_paper_task_has_templates_and_preset_epochs() -> None:
    expected = {"Cars": 35, "DTD": 76, "EuroSAT": 12, "GTSRB": 11, "MNIST": 5,
                "RESISC45": 15, "SUN397": 14, "SVHN": 4}
    assert set(PAPER_TASKS) == set(expected)
    for task, epochs in expected.items():
        spec = DATASETS[task]
        assert spec.epochs == epochs
        assert spec.templates and all(t.count("{}") == 1 for t in spec.templates)
    assert DATASETS["ImageNet"].templates and DATASETS["ImageNet"].epochs is None


def test_written_out_class_tables_have_the_datasets_class_counts() -> None:
    counts = {"DTD": 47, "EuroSAT": 10, "GTSRB": 43, "MNIST": 10, "RESISC45": 45, "SVHN": 10}
    for task, count in counts.items():
        assert len(DATASETS[task].names) == count, task


def test_names_resolve_from_table_then_numeric_then_folder() -> None:
    eurosat = dataset_spec("EuroSAT")
    assert resolve_classnames(eurosat, ["AnnualCrop", "SeaLake"]) == ["annual crop land",
                                                                      "lake or sea"]
    gtsrb = dataset_spec("GTSRB")
    assert resolve_classnames(gtsrb, ["00000", "00014"]) == [
        "red and white circle 20 kph speed limit", "stop"]
    resisc = dataset_spec("RESISC45")
    assert resolve_classnames(resisc, ["baseball_diamond"]) == ["baseball diamond"]
    sun = dataset_spec("SUN397")  # no table: folder names, underscores as spaces
    assert resolve_classnames(sun, ["airplane_cabin", "abbey"]) == ["airplane cabin", "abbey"]


def test_classnames_file_overrides_the_table() -> None:
    overrides = parse_classnames_file("# comment\nForest\tdense woodland\n\n")
    assert overrides == {"Forest": "dense woodland"}
    names = resolve_classnames(dataset_spec("EuroSAT"), ["Forest", "River"], overrides)
    assert names == ["dense woodland", "river"]


def test_classnames_file_errors_name_the_line() -> None:
    with pytest.raises(ValueError, match=r"classnames.txt:2: expected '<folder><TAB>"):
        parse_classnames_file("a\tb\nno tab here\n")


def test_unknown_folders_flag_another_export_layout() -> None:
    assert unknown_folders(dataset_spec("EuroSAT"), ["Forest", "forest_2"]) == ["forest_2"]
    assert unknown_folders(dataset_spec("SUN397"), ["anything"]) == []  # no table


def test_task_names_are_case_insensitive_and_accept_val_suffix() -> None:
    assert base_task_name("CarsVal") == "Cars"
    assert dataset_spec("carsval").name == "Cars"
    generic = dataset_spec("Flowers102")
    assert generic.epochs is None and generic.templates


def test_recipe_presets() -> None:
    assert batch_preset("ViT-B-32").batch_size == 128
    large = batch_preset("ViT-L-14-quickgelu")
    assert (large.batch_size, large.accumulation) == (64, 2)
    cfg = train_config("Cars", "ViT-B-32", "full", 7330, lam=10)
    assert (cfg.lr, cfg.weight_decay, cfg.warmup_steps, cfg.grad_clip) == (1e-5, 0.1, 500, 1.0)
    assert cfg.steps == 35 * (7330 // 128) and cfg.lam == 10
    lora = train_config("MNIST", "ViT-L-14", "lora", 54000)
    assert lora.lr == 1e-4 and (lora.batch_size, lora.accumulation) == (64, 2)
    assert lora.steps == 5 * (54000 // 128)
    assert recipe_steps("Flowers", 300, batch_preset("x"), epochs=2.5) == 5
    with pytest.raises(ValueError, match="fewer than one batch"):
        recipe_steps("MNIST", 100, batch_preset("x"))


def test_recipe_needs_a_length_for_unknown_tasks() -> None:
    with pytest.raises(ValueError, match="--epochs or --steps"):
        train_config("Flowers", "ViT-B-32", "full", 1000)
    assert train_config("Flowers", "ViT-B-32", "full", 1000, steps=7).steps == 7


def test_paradigm_registry_uses_vit_presets() -> None:
    assert set(PARADIGM_RECIPES) == {"full", "linear", "partial", "lora"}
    assert build_paradigm("partial").options() == {"select": "vit_attention"}
    assert build_paradigm("lora", {"rank": 4}).options() == {
        "targets": "vit_attention", "rank": 4, "alpha": 8.0}
    with pytest.raises(KeyError, match="unknown paradigm"):
        build_paradigm("dense")
