"""Shared fixtures for the text family's tests: the tiny asset-free BERT and its tokenizer."""

from __future__ import annotations

import pytest

from orthoreg.zoo.text import model


@pytest.fixture(scope="session")
def tiny_tokenizer() -> model.TextTokenizer:
    return model.get_tokenizer("tiny_bert")


@pytest.fixture
def tiny_encoder():
    """A fresh tiny random BERT encoder (seeded), in eval mode."""
    return model.get_model("tiny_bert", seed=0)
