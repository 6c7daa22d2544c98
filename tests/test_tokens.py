"""Words and phrases to token indices, on a CLIP-style BPE tokenizer built by the test."""
import pytest

from mag_explore.text.bpe import build_clip_tokenizer
from mag_explore.text.tokens import show_tokens, split_words, token_indices, token_table


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    words = ["a", "red", "blue", "circle", "square", "and", "teddy", "bear", "on"]
    return build_clip_tokenizer(words, tmp_path_factory.mktemp("tok"))


def test_bos_is_index_zero_and_words_follow(tok):
    ids = tok("a red circle").input_ids
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    assert token_indices(tok, "a red circle", "red") == [2]
    assert token_indices(tok, "a red circle", "circle") == [3]


def test_a_split_word_gives_all_its_pieces(tok):
    # "purple" is not in the tiny vocabulary: BPE spells it p·u·r·p·l·e</w>, six pieces after BOS and "a"
    prompt = "a purple circle"
    assert token_indices(tok, prompt, "purple") == [2, 3, 4, 5, 6, 7]
    assert token_indices(tok, prompt, "circle") == [8]


def test_occurrences_and_phrases(tok):
    prompt = "a red circle and a red square on a teddy bear"
    assert token_indices(tok, prompt, "red") == [2]
    assert token_indices(tok, prompt, "red", occurrence=2) == [6]
    assert token_indices(tok, prompt, "Teddy Bear") == [10, 11]
    assert token_indices(tok, prompt, "red square") == [6, 7]
    with pytest.raises(ValueError, match="occurs 2 time"):
        token_indices(tok, prompt, "red", occurrence=3)


def test_missing_word_lists_words_and_tokens(tok):
    with pytest.raises(ValueError) as info:
        token_indices(tok, "a red circle", "dog")
    message = str(info.value)
    assert "'dog' is not in the prompt" in message and "['a', 'red', 'circle']" in message and "2:red</w>" in message


def test_punctuation_is_its_own_word(tok):
    words = [w.word for w in split_words(tok, "a red circle, a blue square")]
    assert words == ["a", "red", "circle", ",", "a", "blue", "square"]
    assert token_indices(tok, "a red circle, a blue square", "blue") == [6]


def test_token_table(tok, capsys):
    rows = token_table(tok, "a purple circle")
    assert rows[0]["word"] == "(BOS)" and rows[-1]["word"] == "(EOS)"
    assert {r["word"] for r in rows[2:-2]} == {"purple"}
    text = show_tokens(tok, "a red circle")
    assert "red</w>" in text and capsys.readouterr().out.strip() == text.strip()
