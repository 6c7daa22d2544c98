"""Words -> T5 token indices (Flux's text keys) and SD3's joint text keys, with hand-written expectations."""
from __future__ import annotations

import pytest

from mag_explore import families
from mag_explore.text.t5 import CLIP_POOLED_ONLY, JointPromptTokens
from mag_explore.testing import tiny_tokenizer
from mag_explore.testing.mmdit import tiny_t5_tokenizer
from mag_explore.text.tokens import phrase_occurrences, prompt_tokens, split_words, token_indices


@pytest.fixture(scope="module")
def t5():
    return tiny_t5_tokenizer(512)


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    return tiny_tokenizer(tmp_path_factory.mktemp("clip"))


PROMPT = "a purple circle and a purple square, two bears"


def test_pieces_have_word_starts_no_bos_and_an_eos(t5):
    assert prompt_tokens(t5, PROMPT) == ["▁a", "▁pur", "ple", "▁circle", "▁and", "▁a", "▁pur", "ple", "▁square", ",",
                                         "▁", "t", "w", "o", "▁bear", "s", "</s>"]


def test_subwords_repeats_and_phrases(t5):
    assert token_indices(t5, PROMPT, "purple") == [1, 2]
    assert token_indices(t5, PROMPT, "purple", occurrence=2) == [6, 7]
    assert token_indices(t5, PROMPT, "purple square") == [6, 7, 8]
    assert token_indices(t5, PROMPT, "circle") == [3]
    assert token_indices(t5, PROMPT, "bears") == [14, 15]
    assert token_indices(t5, PROMPT, "two") == [11, 12, 13]  # "▁" alone covers no letter: not part of the word
    assert token_indices(t5, PROMPT, "square ,") == [8, 9]  # punctuation is a word of its own, as for CLIP
    assert [w.word for w in split_words(t5, PROMPT)][:3] == ["a", "purple", "circle"]
    with pytest.raises(ValueError, match="occurs 2 time"):
        token_indices(t5, PROMPT, "purple", occurrence=3)
    with pytest.raises(ValueError, match="'dog' is not in the prompt"):
        token_indices(t5, PROMPT, "dog")


def test_eos_and_padding_belong_to_no_word_and_truncation_drops_words(t5):
    ids = t5(PROMPT, padding="max_length", max_length=32).input_ids
    assert ids[16] == t5.eos_token_id and ids[17:] == [t5.pad_token_id] * 15
    assert all(i < 16 for w in split_words(t5, PROMPT) for i in w.token_indices)
    short = tiny_t5_tokenizer(8)  # max_sequence_length 8: 7 pieces + EOS
    assert token_indices(short, PROMPT, "purple", occurrence=2) == [6]  # cut after ▁pur
    with pytest.raises(ValueError, match="'square' is in the prompt .* cut off"):
        token_indices(short, PROMPT, "square")


def test_sd3_joint_keys_are_clip_then_t5_at_77(clip, t5):
    joint = JointPromptTokens(clip, t5, 256)
    prompt = "a purple circle and a red square"
    # CLIP: 0 <|startoftext|>, 1 a, 2-7 p u r p l e (the tiny BPE spells "purple"), 8 circle, 9 and, 10 a,
    # 11 red, 12 square, 13 <|endoftext|>; T5: 0 ▁a, 1 ▁pur, 2 ple, 3 ▁circle, 4 ▁and, 5 ▁a, 6 ▁red, 7 ▁square
    assert token_indices(joint, prompt, "purple") == [2, 3, 4, 5, 6, 7, 78, 79]
    assert token_indices(joint, prompt, "red square") == [11, 12, 77 + 6, 77 + 7]
    tokens = prompt_tokens(joint, prompt)
    assert len(tokens) == 77 + 9 and tokens[77:79] == ["▁a", "▁pur"] and tokens[-1] == "</s>"
    assert token_indices(joint, "a red circle and a red square", "red square") == [6, 7, 82, 83]  # the README's
    without_t5 = JointPromptTokens(clip, None)
    assert token_indices(without_t5, prompt, "red square") == [11, 12]  # T5 keys are zeros then


def test_flux_uses_clip_only_pooled(t5):
    assert CLIP_POOLED_ONLY == ("flux",)
    assert phrase_occurrences(t5, "a red circle and a red square", "red") == [[1], [5]]
    assert families.FAMILY_DEFAULTS["flux"]["max_sequence_length"] == 512
