"""Build a small CLIP-style BPE tokenizer from a word list, offline.

Stable Diffusion's tokenizer is CLIP's byte-pair encoder: lower-cased words, an
end-of-word marker ``</w>``, BOS ``<|startoftext|>`` at index 0 of every prompt,
EOS ``<|endoftext|>`` (also used as padding), padded to a fixed length.

The real vocabulary has 49,408 entries and cannot be downloaded here, so tests and
the embedded model use a tiny one with the same conventions. Every character gets
a token, so *any* lower-case word can still be tokenized: a word outside the word
list falls back to several sub-word tokens, exactly like a rare word in real CLIP.
"""
from __future__ import annotations

import json
import string
from pathlib import Path

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"


def _bpe(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """Apply BPE merges to one word the way CLIP does (lowest rank first)."""
    parts = list(word[:-1]) + [word[-1] + "</w>"]
    while len(parts) > 1:
        pairs = [(ranks.get((a, b), None), i) for i, (a, b) in enumerate(zip(parts, parts[1:]))]
        known = [(r, i) for r, i in pairs if r is not None]
        if not known:
            break
        rank, _ = min(known)
        a, b = [(p, q) for p, q in zip(parts, parts[1:]) if ranks.get((p, q)) == rank][0]
        merged, i = [], 0
        while i < len(parts):
            if i < len(parts) - 1 and parts[i] == a and parts[i + 1] == b:
                merged.append(a + b)
                i += 2
            else:
                merged.append(parts[i])
                i += 1
        parts = merged
    return parts


def build_vocab_and_merges(words: list[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Vocabulary and merges so that every word in ``words`` is a single token.

    New merges are appended with the lowest priority, which never changes how an
    earlier word is split (its own merges always win), so words can be added one by one.
    """
    chars = sorted(set(string.ascii_lowercase + string.digits + ".,!?'-&"))
    tokens = chars + [c + "</w>" for c in chars]
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    for word in words:
        word = word.lower()
        if not word or any(c not in chars for c in word):
            raise ValueError(f"word {word!r} must be non-empty and use only {''.join(chars)!r}")
        parts = _bpe(word, ranks)
        while len(parts) > 1:
            pair = (parts[0], parts[1])
            ranks[pair] = len(merges)
            merges.append(pair)
            tokens.append(pair[0] + pair[1])
            parts = _bpe(word, ranks)
    vocab: dict[str, int] = {}
    for tok in tokens + [BOS, EOS]:
        vocab.setdefault(tok, len(vocab))
    return vocab, merges


def write_clip_tokenizer_files(words: list[str], folder: str | Path) -> Path:
    """Write ``vocab.json`` and ``merges.txt`` (CLIP's file format) into ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = build_vocab_and_merges(words)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in merges]
    (folder / "merges.txt").write_text("\n".join(lines) + "\n")
    return folder


def build_clip_tokenizer(words: list[str], folder: str | Path, max_length: int = 77):
    """A ``transformers.CLIPTokenizer`` over ``words`` with CLIP's special tokens."""
    from transformers import CLIPTokenizer

    folder = write_clip_tokenizer_files(words, folder)
    return CLIPTokenizer(
        vocab=str(folder / "vocab.json"),
        merges=str(folder / "merges.txt"),
        model_max_length=max_length,
    )
