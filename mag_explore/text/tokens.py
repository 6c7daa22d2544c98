"""Words and phrases of a prompt -> the token indices that the cross-attention sees.

Cross-attention has one key per *token*, not per word. Index 0 is always the BOS
token ``<|startoftext|>`` (as in the official MAG code, which counts word ids from
1), a rare word may be split into several BPE tokens, and a word can occur twice.
Getting these indices wrong is the most common silent bug in attention-control code,
so everything here is explicit and checked.

T5 (Flux.1, SD3) marks word starts with ``▁`` and has no BOS: its tokenizers, and SD3's
joint text keys (CLIP then T5), are handled by :mod:`mag_explore.text.t5`, and every
function here accepts them too.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from . import t5
from .keys import TextKeys

_END_OF_WORD = "</w>"


@dataclass(frozen=True)
class TokenizedWord:
    """One word of the prompt and the positions of its BPE tokens (BOS = 0)."""

    word: str
    token_indices: tuple[int, ...]
    tokens: tuple[str, ...]


def prompt_tokens(tokenizer, prompt: str) -> list[str]:
    """The prompt's token strings without padding: BOS, the prompt's tokens, EOS (T5: no BOS;
    SD3's joint keys: the 77 CLIP keys, then T5's)."""
    if isinstance(tokenizer, (t5.JointPromptTokens, TextKeys)):
        return tokenizer.prompt_tokens(prompt)
    if t5.is_sentencepiece(tokenizer):
        return t5.t5_prompt_tokens(tokenizer, prompt)
    ids = tokenizer(prompt, truncation=True, max_length=tokenizer.model_max_length).input_ids
    return tokenizer.convert_ids_to_tokens(ids)


def split_words(tokenizer, prompt: str) -> list[TokenizedWord]:
    """Group the prompt's tokens into words (a word ends at a token ending in ``</w>``; T5: see text.t5)."""
    if isinstance(tokenizer, t5.JointPromptTokens):
        return tokenizer.split_words(prompt, split_words(tokenizer.clip, prompt))
    if isinstance(tokenizer, TextKeys):  # templates, LM encoders, kept positions (PixArt-Σ, Sana, ...)
        return tokenizer.split_words(prompt)
    if t5.is_sentencepiece(tokenizer):
        return t5.t5_split_words(tokenizer, prompt)
    tokens = prompt_tokens(tokenizer, prompt)
    words: list[TokenizedWord] = []
    current: list[int] = []
    for index, token in enumerate(tokens):
        if index == 0 or token in (tokenizer.eos_token, tokenizer.pad_token):
            continue  # BOS and EOS belong to no word
        current.append(index)
        if token.endswith(_END_OF_WORD):
            pieces = tuple(tokens[i] for i in current)
            text = "".join(token_text(p) for p in pieces)
            words.append(TokenizedWord(text, tuple(current), pieces))
            current = []
    if current:  # truncated in the middle of a word
        pieces = tuple(tokens[i] for i in current)
        words.append(TokenizedWord("".join(pieces), tuple(current), pieces))
    return words


def words_of(text: str) -> list[str]:
    """The words of a text as CLIP's tokenizer sees them: lower case, punctuation split off.

    ``words_of("A red circle, and...") == ["a", "red", "circle", ",", "and", ".", ".", "."]``;
    the one word splitter of the package (phrases, prompts, the layout builder).
    """
    return re.findall(r"[a-z0-9]+|[^\sa-z0-9]", text.lower())


def token_text(token: str) -> str:
    """A token string without the end-of-word marker: ``"circle</w>"`` -> ``"circle"``."""
    return token.replace(_END_OF_WORD, "")


def token_indices(tokenizer, prompt: str, phrase: str, occurrence: int = 1) -> list[int]:
    """Token indices (BOS = 0) of ``phrase`` in ``prompt``, all sub-word pieces included.

    ``phrase`` may be one word ("circle") or several ("teddy bear"); ``occurrence``
    picks the n-th match (1-based) when the phrase appears more than once.

    >>> token_indices(tok, "a red circle and a red square", "red", occurrence=2)
    [6]
    """
    matches = phrase_occurrences(tokenizer, prompt, phrase)
    if not 1 <= occurrence <= len(matches):
        raise ValueError(
            f"occurrence={occurrence} but {phrase!r} occurs {len(matches)} time(s) in {prompt!r}; "
            f"use 1..{len(matches)}"
        )
    return matches[occurrence - 1]


def phrase_occurrences(tokenizer, prompt: str, phrase: str) -> list[list[int]]:
    """The token indices of every occurrence of ``phrase`` in ``prompt``, in order (at least one)."""
    words = split_words(tokenizer, prompt)
    query = words_of(phrase)
    if not query:
        raise ValueError(f"empty phrase {phrase!r}: name one or more words of the prompt")
    found = t5.occurrences(words, query)
    if not found and t5.occurrences([t5.Word(w, (i,), ()) for i, w in enumerate(words_of(prompt))],
                                           query):
        limit = getattr(tokenizer, "max_length", None) or getattr(tokenizer, "model_max_length", None)
        raise ValueError(
            f"{phrase!r} is in the prompt {prompt!r} but past what the text encoder reads (at most {limit} tokens "
            f"here): its tokens were cut off, so no attention key belongs to it. Shorten the prompt or put the "
            f"phrase earlier; the words that have keys are {[w.word for w in words]}"
        )
    if not found:
        raise ValueError(
            f"{phrase!r} is not in the prompt {prompt!r}. Its words are {[w.word for w in words]} "
            f"and its tokens are {describe_tokens(tokenizer, prompt)}"
        )
    return found


def describe_tokens(tokenizer, prompt: str) -> str:
    """Compact ``index:token`` listing, used in error messages."""
    return " ".join(f"{i}:{t}" for i, t in enumerate(prompt_tokens(tokenizer, prompt)))


def token_table(tokenizer, prompt: str) -> list[dict]:
    """One row per token: its index, token string, id and the word it belongs to.

    In a notebook, ``show_tokens`` prints this as a table.
    """
    ids = tokenizer(prompt, truncation=True, max_length=tokenizer.model_max_length).input_ids
    tokens = tokenizer.convert_ids_to_tokens(ids)
    word_of = {i: w.word for w in split_words(tokenizer, prompt) for i in w.token_indices}
    special = {0: "(BOS)", len(tokens) - 1: "(EOS)"}
    return [
        {"index": i, "token": t, "id": ids[i], "word": word_of.get(i, special.get(i, ""))}
        for i, t in enumerate(tokens)
    ]


def show_tokens(tokenizer, prompt: str) -> str:
    """The tokenization as a plain-text table (returned and printed)."""
    rows = token_table(tokenizer, prompt)
    lines = [f"{'index':>5}  {'token':<20} {'id':>6}  word"]
    lines += [f"{r['index']:>5}  {r['token']:<20} {r['id']:>6}  {r['word']}" for r in rows]
    text = "\n".join(lines)
    print(text)
    return text
