"""Words and phrases -> token indices for T5 (sentencepiece) prompts and SD3's joint text keys.

T5's tokenizer marks the *start* of a word with ``▁`` (CLIP marks the end with ``</w>``),
has no BOS token (index 0 is the first piece of the first word), appends ``</s>`` (EOS)
and pads with ``<pad>`` up to ``max_sequence_length`` (Flux: 512, SD3: 256 by default).
Pieces are assigned to words by their character offsets in the prompt, so a word split
into several pieces (``▁pur`` ``ple``), a word that repeats, and punctuation glued to a word
all come out right. Padding and EOS belong to no word.

Which text keys a model's attention has:

* **Flux.1**: the T5 tokens only (``max_sequence_length`` of them, padding included). Its
  CLIP encoder feeds only the pooled vector (``pooled_projections``: the timestep/guidance
  embedding), so *no* CLIP token is a key: :data:`CLIP_POOLED_ONLY` says which models.
* **SD3**: 77 CLIP keys (both CLIPs' penultimate states, concatenated along features and
  zero-padded to T5's width, so key i is CLIP token i of both tokenizers), then the T5
  tokens at 77 + j. A phrase's keys are its CLIP tokens *and* its T5 tokens
  (:class:`JointPromptTokens`). Both CLIPs' pooled vectors feed the pooled input as well,
  which summarises every token: the pooled path cannot be tied to a word.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

#: Families whose CLIP text encoder reaches the denoiser only through its pooled vector.
CLIP_POOLED_ONLY = ("flux",)
WORD_START = "▁"
_WORD = re.compile(r"[a-z0-9]+|[^\sa-z0-9]")  # the word splitter of tokens.words_of, with positions


@dataclass(frozen=True)
class Word:
    """One word of the prompt and the positions of its tokens."""

    word: str
    token_indices: tuple[int, ...]
    tokens: tuple[str, ...]


def is_sentencepiece(tokenizer) -> bool:
    """Whether ``tokenizer`` is T5's (word starts marked with ``▁``, no BOS)."""
    return type(tokenizer).__name__.startswith("T5Tokenizer")


def t5_prompt_tokens(tokenizer, prompt: str, max_length: int | None = None) -> list[str]:
    """The prompt's T5 pieces without padding: the words' pieces, then ``</s>``."""
    ids = tokenizer(prompt, truncation=True, max_length=max_length or tokenizer.model_max_length).input_ids
    return tokenizer.convert_ids_to_tokens(ids)


def t5_split_words(tokenizer, prompt: str, max_length: int | None = None) -> list[Word]:
    """The prompt's words (as ``tokens.words_of`` splits them) with the T5 pieces that cover them."""
    encoded = tokenizer(prompt, truncation=True, max_length=max_length or tokenizer.model_max_length,
                        return_offsets_mapping=True)
    pieces = tokenizer.convert_ids_to_tokens(encoded.input_ids)
    special = set(tokenizer.all_special_ids)
    words = []
    for match in _WORD.finditer(prompt.lower()):
        start, end = match.span()
        covering = tuple(i for i, (a, b) in enumerate(encoded.offset_mapping)
                         if encoded.input_ids[i] not in special and a < end and b > start)
        if covering:  # a word cut off by max_length has no piece left
            words.append(Word(match.group(), covering, tuple(pieces[i] for i in covering)))
    return words


def occurrences(words: list[Word], query: list[str]) -> list[list[int]]:
    """Token indices of each run of ``words`` whose texts are ``query``, in order."""
    texts = [w.word for w in words]
    starts = [i for i in range(len(texts) - len(query) + 1) if texts[i: i + len(query)] == query]
    runs = []
    for s in starts:  # ascending (SD3: CLIP keys, then T5 keys); a piece shared by two words is listed once
        indices = [i for w in words[s: s + len(query)] for i in w.token_indices]
        runs.append(sorted(set(indices)))
    return runs


class JointPromptTokens:
    """SD3's text keys: 77 CLIP positions, then the T5 positions at ``clip_length + j``.

    Stands in for a tokenizer wherever ``mag_explore.text.tokens`` takes one (layouts, results):
    a phrase's indices are its CLIP tokens and its T5 tokens. Without a T5 encoder (SD3 run
    with ``text_encoder_3=None``) the T5 keys are zeros, so only the CLIP indices are given.
    """

    def __init__(self, clip_tokenizer, t5_tokenizer=None, max_sequence_length: int = 256):
        self.clip, self.t5, self.max_length = clip_tokenizer, t5_tokenizer, max_sequence_length
        self.clip_length = clip_tokenizer.model_max_length

    def prompt_tokens(self, prompt: str) -> list[str]:
        """Every CLIP key's token (padding included: 77 of them), then the T5 tokens without padding."""
        ids = self.clip(prompt, padding="max_length", max_length=self.clip_length, truncation=True).input_ids
        clip = self.clip.convert_ids_to_tokens(ids)
        return clip + (t5_prompt_tokens(self.t5, prompt, self.max_length) if self.t5 is not None else [])

    def split_words(self, prompt: str, clip_words: list) -> list[Word]:
        """Each CLIP word with the T5 pieces of the same word added (shifted by 77)."""
        if self.t5 is None:
            return [Word(w.word, w.token_indices, w.tokens) for w in clip_words]
        t5_words = t5_split_words(self.t5, prompt, self.max_length)
        if [w.word for w in clip_words] != [w.word for w in t5_words][: len(clip_words)]:
            raise ValueError(f"CLIP and T5 split {prompt!r} into different words: {[w.word for w in clip_words]} "
                             f"vs {[w.word for w in t5_words]}; name the phrase's tokens by index instead")
        return [Word(c.word, c.token_indices + tuple(self.clip_length + i for i in t.token_indices), c.tokens + t.tokens)
                for c, t in zip(clip_words, t5_words)]
