"""Where a prompt's words sit among a model's text keys, for templated prompts and LM text encoders.

Newer models do not feed the tokenized prompt to the image as it is:

* **PixArt-Σ**: T5, no BOS, padded to ``max_sequence_length`` (300) with an attention mask, so
  the keys are the T5 pieces themselves (key j = token j).
* **Sana**: a Gemma-2 LM reads a long "complex human instruction" *followed by* the prompt;
  then only ``<bos>`` and the last ``max_sequence_length − 1`` positions are kept as keys, so
  the prompt's first piece is key 1 however long the instruction is.
* a family of your own may prepend a template ("a photo of {}").

:class:`TextKeys` answers "which keys are this word's" for all of these from the fast
tokenizer's character offsets: the text the encoder sees is ``prefix + prompt``; it is cut
at ``max_length`` tokens; ``keep`` lists which token positions become keys, in order. A word
whose pieces were cut off has no key, and asking for it is an error that says so. A ``suffix``
(the end of a chat template) may follow the prompt; its tokens belong to no word of the prompt.
``mag_explore.text.tokens`` accepts a TextKeys wherever it takes a tokenizer.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Sequence

_WORD = re.compile(r"[a-z0-9]+|[^\sa-z0-9]")  # tokens.words_of's splitter, with positions


@dataclass(frozen=True)
class Word:
    """One word of the prompt and the keys of its tokens."""

    word: str
    token_indices: tuple[int, ...]
    tokens: tuple[str, ...]


class TextKeys:
    """The text keys of one model for one setting (see the module docstring).

    Args:
        tokenizer: a fast tokenizer (``return_offsets_mapping``).
        max_length: tokens the encoder reads (prefix included), the rest is cut off.
        prefix: text put before the prompt (Sana's instruction, a chat template's start), or "".
        keep: token positions that become keys, negative ones counted from ``max_length``
            (None: every position, key j = token j).
        preprocess: what the pipeline does to the prompt first (PixArt/Sana: lower case, strip).
        suffix: text put after the prompt (a chat template's end), or "".
    """

    def __init__(self, tokenizer, max_length: int, prefix: str = "", keep: Sequence[int] | None = None,
                 preprocess: Callable[[str], str] | None = None, suffix: str = ""):
        self.tokenizer, self.max_length, self.prefix, self.suffix = tokenizer, max_length, prefix, suffix
        positions = range(max_length) if keep is None else [k % max_length for k in keep]
        self.key_of = {position: key for key, position in enumerate(positions)}  # token position -> key
        self.preprocess = preprocess or (lambda text: text)

    def _encode(self, prompt: str):
        text = self.prefix + self.preprocess(prompt) + self.suffix
        encoded = self.tokenizer(text, truncation=True, max_length=self.max_length, return_offsets_mapping=True)
        return text, encoded

    def prompt_tokens(self, prompt: str) -> list[str]:
        """The token of each key, up to the last one the text fills (no padding)."""
        _, encoded = self._encode(prompt)
        pieces = self.tokenizer.convert_ids_to_tokens(encoded.input_ids)
        keys = sorted((key, position) for position, key in self.key_of.items() if position < len(pieces))
        return [pieces[position] for _, position in keys]

    def split_words(self, prompt: str) -> list[Word]:
        """Each word of the prompt (as ``tokens.words_of`` splits it) with the keys of the pieces covering it."""
        text, encoded = self._encode(prompt)
        pieces = self.tokenizer.convert_ids_to_tokens(encoded.input_ids)
        special = set(self.tokenizer.all_special_ids)
        start_of_prompt, end_of_prompt = len(self.prefix), len(text) - len(self.suffix)
        words = []
        for match in _WORD.finditer(text[start_of_prompt:end_of_prompt].lower()):
            start, end = match.start() + start_of_prompt, match.end() + start_of_prompt
            covering = [i for i, (a, b) in enumerate(encoded.offset_mapping)
                        if encoded.input_ids[i] not in special and a < end and b > start and i in self.key_of]
            if covering:  # a word cut off by max_length (or dropped by keep) has no key
                words.append(Word(match.group(), tuple(self.key_of[i] for i in covering),
                                  tuple(pieces[i] for i in covering)))
        return words

    def __repr__(self) -> str:
        return (f"TextKeys({type(self.tokenizer).__name__}, max_length={self.max_length}, "
                f"prefix of {len(self.prefix)} characters, {len(self.key_of)} keys)")
