"""Words -> text keys for prompts that sit inside a template (Qwen-Image; later Flux.2, Z-Image).

A language-model text encoder reads the prompt inside a chat template, and the denoiser's text
keys are a *slice* of the template's tokens: Qwen-Image keeps everything after the first 34
tokens (the system turn), so key j is template token 34 + j, and the 5 tokens that close the
template follow the prompt's. Byte-level BPE (Qwen's tokenizer) marks a word start with ``Ġ``
(a space) and may split a word into several pieces (" pur" "ple").

:class:`TemplateKeys` stands in for a tokenizer wherever ``mag_explore.tokens`` takes one. It
tokenizes the *filled-in template*, and gives each word of the prompt the keys whose character
offsets overlap it: a word repeated, a word in pieces and punctuation all come out right, and a
word past ``max_sequence_length`` has no key (so asking for it is an error that lists the words
that are there).
"""
from __future__ import annotations

from .t5_tokens import _WORD, Word


class TemplateKeys:
    """The text keys of a templated prompt: template tokens ``drop``, ``drop + 1``, ... (at most ``max_length``)."""

    def __init__(self, tokenizer, template: str, drop: int, max_length: int):
        if template.count("{}") != 1:
            raise ValueError(f"template {template!r} must hold exactly one '{{}}' for the prompt")
        self.tokenizer, self.template, self.drop, self.max_length = tokenizer, template, drop, max_length

    def _encode(self, prompt: str):
        return self.tokenizer(self.template.format(prompt), return_offsets_mapping=True)

    def prompt_tokens(self, prompt: str) -> list[str]:
        """Every text key's token: the prompt's, then the template's closing tokens (no padding)."""
        ids = self._encode(prompt).input_ids[self.drop:][: self.max_length]
        return self.tokenizer.convert_ids_to_tokens(ids)

    def split_words(self, prompt: str) -> list[Word]:
        """The prompt's words (as ``tokens.words_of`` splits them) with the keys that cover them."""
        encoded = self._encode(prompt)
        start = self.template.index("{}")  # the prompt's first character in the filled-in template
        keys = range(self.drop, min(len(encoded.input_ids), self.drop + self.max_length))
        pieces = self.tokenizer.convert_ids_to_tokens(encoded.input_ids)
        words = []
        for match in _WORD.finditer(prompt.lower()):
            a, b = match.start() + start, match.end() + start
            covering = tuple(i - self.drop for i in keys if encoded.offset_mapping[i][0] < b
                             and encoded.offset_mapping[i][1] > a)
            if covering:  # a word past max_length has no key left
                words.append(Word(match.group(), covering, tuple(pieces[i + self.drop] for i in covering)))
        return words
