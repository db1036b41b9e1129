"""The fast word encoder gives exactly the Rust tokenizer's ids, or hands the document to the Rust tokenizer."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
from tiny_assets import QUICKSTART
from tokenizers import (
    Regex,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    trainers,
)

from ptflow.data.fastencode import WordEncoder

LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                  r"\s*[\r\n]+|\s+(?!\S)|\s+")
TRICKY = ("\x1c\x1d\x1e\x1f\x85\xa0\u2028\u2029\u3000\u200b\ufeff\t\x0b\x0c\r\n "  # whitespace and its look-alikes
          "\u017f\u212a\u0130\u0131\u00df\u1e9e"  # letters that case-fold to ASCII (ſ K İ ı ß ẞ)
          "\u0661\u0662\u00b2\u00bd\u2167\u0966\uff11"  # digits and numbers of other scripts
          "\u0301\u0308\u20dd\u0e31"  # combining marks
          "\u00e9\u4e2d\u6587\u3042\u0416\u05d0\U0001f600\U0001f468\u200d\U0001f469"  # letters, CJK, emoji, ZWJ
          "'\"_-.,;:!?()[]{}<>/\\|@#$%^&*~`+=0123456789abcXYZ")
SPECIAL = ["<s>", "</s>", "<pad>"]


def corpus(seed: int, n: int = 300) -> list[str]:
    rng = random.Random(seed)
    words = ["the", "The", "don't", "we'll", "I'M", "x1", "123456", "  ", "\n\n", "def", "return", "café",
             "naïve", "über", "東京", "🙂", "'s", "'S", "'\u017f", "ſ", *SPECIAL]
    docs = []
    for _ in range(n):
        parts = []
        for _ in range(rng.randint(0, 40)):
            if rng.random() < 0.5:
                parts.append(rng.choice(words))
            else:
                parts.append("".join(rng.choice(TRICKY) for _ in range(rng.randint(1, 6))))
            parts.append(rng.choice(["", " ", "  ", "\n", "\t", "\r\n"]))
        docs.append("".join(parts))
    return docs + ["", " ", "\n", "a", " a", "a ", "  a  ", "<s>", "x</s>y"]


def train_tokenizer(pre_tokenizer, normalizer=None) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizer
    if normalizer is not None:
        tok.normalizer = normalizer
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=SPECIAL, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus(0, 200) * 3, trainer=trainer)
    return tok


def llama3_style() -> Tokenizer:
    return train_tokenizer(pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]))


def exact(tok: Tokenizer, texts: list[str]) -> list[list[int]]:
    return [e.ids for e in tok.encode_batch(texts, add_special_tokens=False)]


@pytest.mark.parametrize("make", [
    lambda: Tokenizer.from_file(str(QUICKSTART / "model" / "tokenizer.json")),  # GPT-2 ByteLevel regex
    lambda: train_tokenizer(pre_tokenizers.ByteLevel(add_prefix_space=True)),
    llama3_style,
], ids=["bytelevel", "bytelevel-prefix-space", "split-then-bytelevel"])
def test_identical_ids_on_adversarial_text(make):
    tok = make()
    fast = WordEncoder.for_tokenizer(tok)
    assert fast is not None
    for seed in range(1, 4):
        texts = corpus(seed)
        assert fast(texts) == exact(tok, texts)
    assert fast.fast_docs > 0 and fast.slow_docs > 0  # both paths were taken
    assert "<s>" not in fast.safe  # special-token text always goes through the Rust pipeline


def test_characters_the_engines_disagree_on_go_to_rust():
    tok = Tokenizer.from_file(str(QUICKSTART / "model" / "tokenizer.json"))
    fast = WordEncoder.for_tokenizer(tok)
    # U+0558 is a letter since Unicode 16: Python's regex knows it, the Rust tokenizer's engine does not
    texts = ["x\u0558y z", "plain text"]
    assert fast(texts) == exact(tok, texts)
    assert "\u0558" in fast.unsafe and "\x1c" not in fast.unsafe
    assert (fast.slow_docs, fast.fast_docs) == (1, 1)


def test_the_factored_gpt2_pattern_splits_as_gpt2s_own():
    import regex

    from ptflow.data.fastencode import GPT2_PATTERN

    gpt2 = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")
    factored = regex.compile(GPT2_PATTERN)
    texts = [t for seed in range(1, 6) for t in corpus(seed)] + ["it's don't we're they've I'm we'll he'd x'S x'x x'' x'red 'llama'"]
    assert [factored.findall(t) for t in texts] == [gpt2.findall(t) for t in texts]


@pytest.mark.parametrize("make", [
    lambda: Tokenizer.from_file(str(QUICKSTART / "model" / "tokenizer.json")),
    llama3_style,
    lambda: train_tokenizer(pre_tokenizers.ByteLevel(), normalizers.NFKC()),
], ids=["bytelevel", "split-then-bytelevel", "normalized"])
def test_the_shape_is_read_from_the_rust_objects_as_tokenizer_json_says(make):
    from ptflow.data.fastencode import _spec

    tok = make()
    full, spec = json.loads(tok.to_str()), _spec(tok)  # _spec skips serializing the vocabulary
    assert spec["pre_tokenizer"] == full["pre_tokenizer"]
    assert (spec["normalizer"] is None) == (full["normalizer"] is None)
    assert sorted(t["content"] for t in spec["added_tokens"]) == sorted(t["content"] for t in full["added_tokens"])


def test_unsupported_shapes_are_left_to_rust():
    assert WordEncoder.for_tokenizer(train_tokenizer(pre_tokenizers.Whitespace())) is None
    assert WordEncoder.for_tokenizer(train_tokenizer(pre_tokenizers.ByteLevel(), normalizers.NFKC())) is None
    split_prefix = train_tokenizer(pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=True, use_regex=False)]))
    assert WordEncoder.for_tokenizer(split_prefix) is None


def test_a_fast_path_that_differs_is_switched_off(caplog):
    from ptflow.data.shards import Encoder

    tok = Tokenizer.from_file(str(QUICKSTART / "model" / "tokenizer.json"))
    encoder = Encoder(tok)
    assert encoder.fast is not None
    wrong = np.array([7, 7, 7], dtype=encoder.fast.dtype).tobytes()
    encoder.fast.cache["hello"] = wrong  # corrupt the piece cache: the fast path is now wrong
    texts = ["hello world", "say hello"]
    encoder.check(texts, "a shard")
    assert encoder.fast is None and "differs from the tokenizer on a shard" in caplog.text
    assert encoder(texts) == exact(tok, texts)
