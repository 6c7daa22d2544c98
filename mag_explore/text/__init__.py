"""Words and phrases -> token indices, per tokenizer and template.

* :mod:`.tokens` - the prompt's tokens and words, for any tokenizer; where a phrase's tokens sit;
* :mod:`.bpe` - a CLIP byte-pair tokenizer built offline (the embedded and tiny models use it);
* :mod:`.t5` - T5 / SentencePiece words, and the joint CLIP + T5 keys of Flux.1 and SD3;
* :mod:`.keys` - :class:`TextKeys`, the keys of a prompt under a chat template (Qwen, Gemma, Mistral).
"""
from .bpe import build_clip_tokenizer
from .keys import TextKeys
from .t5 import CLIP_POOLED_ONLY, JointPromptTokens
from .tokens import (TokenizedWord, describe_tokens, phrase_occurrences, prompt_tokens, show_tokens, split_words,
                     token_indices, token_table, token_text, words_of)

__all__ = ["CLIP_POOLED_ONLY", "JointPromptTokens", "TextKeys", "TokenizedWord", "build_clip_tokenizer", "describe_tokens",
           "phrase_occurrences", "prompt_tokens", "show_tokens", "split_words", "token_indices", "token_table",
           "token_text", "words_of"]
