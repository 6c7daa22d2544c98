"""What the layout tools share: the prompt's words as choices, phrases from word positions, quiet updates."""
from __future__ import annotations

import html
from contextlib import contextmanager
from typing import Iterable, Iterator

from ..text.tokens import words_of


def word_options(words: list[str]) -> list[tuple[str, int]]:
    """``(label, position)`` per word for a picker; a repeated word is labelled by occurrence, "red (2)"."""
    counts = {w: words.count(w) for w in words}
    seen: dict[str, int] = {}
    options = []
    for i, word in enumerate(words):
        seen[word] = seen.get(word, 0) + 1
        options.append((word if counts[word] == 1 else f"{word} ({seen[word]})", i))
    return options


def positions_of(words: list[str], phrase: str, occurrence: int = 1) -> tuple[int, ...]:
    """Word positions of the ``occurrence``-th ``phrase`` in ``words`` (the inverse of :func:`phrase_at`)."""
    query = words_of(phrase)
    starts = [i for i in range(len(words) - len(query) + 1) if words[i:i + len(query)] == query]
    if not query or len(starts) < occurrence:
        raise ValueError(f"{phrase!r} (occurrence {occurrence}) is not in the prompt's words {words}")
    start = starts[occurrence - 1]
    return tuple(range(start, start + len(query)))


def phrase_at(words: list[str], positions: Iterable[int]) -> tuple[str, int]:
    """(phrase, occurrence) of consecutive word positions: (4, 5) of "a red circle and a red square" -> ("a red", 2)."""
    positions = sorted(positions)
    if not positions:
        raise ValueError("pick one or more words of the prompt")
    if positions != list(range(positions[0], positions[-1] + 1)):
        raise ValueError(f"the words {[words[i] for i in positions]} are not consecutive in the prompt")
    query = words[positions[0]:positions[-1] + 1]
    earlier = [i for i in range(positions[0]) if words[i:i + len(query)] == query]
    return " ".join(query), len(earlier) + 1


@contextmanager
def quiet_updates(owner) -> Iterator[None]:
    """Set controls without their observers acting (``owner._loading`` tells them to wait)."""
    owner._loading = True
    try:
        yield
    finally:
        owner._loading = False


def show_layout_status(owner):
    """Read ``owner.layout`` and say in ``owner.status`` what it holds (or why it is not ready yet).

    Returns the layout, or None when it is not ready.
    """
    try:
        layout = owner.layout
    except ValueError as error:
        owner.status.value = f"<span style='color:#b00'>{html.escape(str(error))}</span>"
        return None
    areas = ", ".join(f"{layout.label(i)} {r.area:.0%}" for i, r in enumerate(layout.regions))
    owner.status.value = f"{len(layout)} region(s): {html.escape(areas)}"
    return layout
