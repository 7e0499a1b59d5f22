"""Prompt templates, class-name resolution and recipe presets (pure data: no open_clip)."""

from __future__ import annotations

import pytest

from orthoreg.clip.recipe import (
    PARADIGM_RECIPES,
    autocast_for,
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
    assert cfg.lam == 10 and cfg.amp is False  # fp32, as the authors train
    lora = train_config("MNIST", "ViT-L-14", "lora", 54000)
    assert lora.lr == 1e-4 and (lora.batch_size, lora.accumulation) == (64, 2)
    with pytest.raises(ValueError, match="fewer than one batch"):
        recipe_steps("MNIST", 100, batch_preset("x"))


def test_steps_count_the_authors_loader_length() -> None:
    """epochs × ⌈n / b⌉ (a DataLoader without drop_last) // accumulation, not ⌊n / b⌋."""
    # Cars: 7330 images → ⌈7330/128⌉ = 58 batches (57 full + one of 34) × 35 epochs
    assert train_config("Cars", "ViT-B-32", "full", 7330).steps == 35 * 58 == 2030
    assert 35 * (7330 // 128) == 1995  # what drop-last counting gave
    # exactly divisible: no partial batch, the two counts agree
    assert recipe_steps("MNIST", 128 * 100, batch_preset("x")) == 5 * 100
    # one image over: one more batch per epoch
    assert recipe_steps("MNIST", 128 * 100 + 1, batch_preset("x")) == 5 * 101
    # ViT-L/14: micro-batches of 64, 2 per step: 5 × ⌈54000/64⌉ // 2 = 5 × 844 // 2
    assert train_config("MNIST", "ViT-L-14", "lora", 54000).steps == 2110
    assert recipe_steps("Flowers", 300, batch_preset("x"), epochs=2.5) == 7  # int(2.5 × 3)


def test_precision_is_fp32_unless_bf16_is_asked_for() -> None:
    assert autocast_for("fp32") is False and autocast_for("bf16") is True
    assert train_config("Cars", "ViT-B-32", "full", 7330, amp=True).amp is True
    with pytest.raises(KeyError, match="unknown precision 'fp16'"):
        autocast_for("fp16")


def test_template_counts_match_the_literature() -> None:
    """Ilharco et al.'s templates per task, and OpenAI's 80 ImageNet prompts."""
    counts = {"Cars": 8, "DTD": 8, "EuroSAT": 3, "GTSRB": 3, "MNIST": 1, "RESISC45": 18,
              "SUN397": 2, "SVHN": 1, "ImageNet": 80}
    for task, count in counts.items():
        templates = DATASETS[task].templates
        assert len(templates) == count == len(set(templates)), task
    resisc = DATASETS["RESISC45"].templates
    for kind in ("imagery", "photo", "view"):
        for source in ("satellite", "aerial"):
            for article in ("", "a ", "the "):
                assert f"{source} {kind} of {article}{{}}." in resisc
    imagenet = DATASETS["ImageNet"].templates
    assert imagenet[0] == "a bad photo of a {}." and imagenet[-1] == "a tattoo of the {}."


def test_imagenet_templates_are_open_clips_openai_list() -> None:
    metadata = pytest.importorskip("open_clip.zero_shot_metadata")
    expected = [template("{}") for template in metadata.OPENAI_IMAGENET_TEMPLATES]
    assert list(DATASETS["ImageNet"].templates) == expected


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
