"""Settings of a method, and sweeps over them: ``--sweep mag.alpha=0.02,0.05,0.1``.

A *setting* is a dict of keyword options for one method's control (``{"alpha": 0.05}``);
``{}`` is the method's default (the model's defaults, else the published ones). A sweep
gives each method a list of settings; several ``--sweep`` options for one method
combine as a grid (every combination), and the default setting is always evaluated
first, so a frontier line passes through the default and marks it.

Values are read as numbers, ``a:b`` pairs (``step_range=0:10``: step indices ``[0, 10)``),
``none``, ``true``/``false`` or plain words (``nearest``) - never run as code. The options
are the control's keywords: ``swap.while_t_above=600,800``, ``mag.step_range=0:5``,
``pww.weight=0.4``, ``lg.loss_scale=10``.
"""
from __future__ import annotations

import itertools
import re
from typing import Mapping, Sequence

DEFAULT = "default"  # the label of the setting {} (every option at its default)
Settings = Mapping[str, Sequence[dict]]  # method -> its settings


def parse_value(text: str, where: str):
    """One value of a sweep: 0.05 -> float, 700 -> int, 0:10 -> (0, 10), 5: -> (5, None), none -> None, nearest -> str."""
    text = text.strip()
    lowered = text.lower()
    if lowered in ("none", "null"):
        return None
    if lowered in ("true", "false"):
        return lowered == "true"
    if re.fullmatch(r"-?\d+", text):
        return int(text)
    if re.fullmatch(r"-?(\d+\.?\d*|\.\d+)(e-?\d+)?", lowered):
        return float(text)
    if match := re.fullmatch(r"(\d+):(\d*)", text):
        return (int(match[1]), int(match[2]) if match[2] else None)
    if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_+-]*", text):
        return text
    raise ValueError(f"{where}: cannot read the value {text!r}; give a number, a step range a:b, none, "
                     f"true/false or a word")


def parse_sweeps(specs: Sequence[str], methods: Sequence[str] | None = None) -> dict[str, list[dict]]:
    """``["mag.alpha=0.05,0.1", "swap.step_range=0:5,0:10"]`` -> ``{"mag": [{}, {"alpha": 0.05}, ...], ...}``."""
    values: dict[str, dict[str, list]] = {}
    for spec in specs:
        head, equals, tail = spec.partition("=")
        method, dot, key = head.strip().partition(".")
        if not equals or not dot or not method or not key.isidentifier() or not tail.strip():
            raise ValueError(f"--sweep {spec!r}: write it as method.option=v1,v2,... (e.g. mag.alpha=0.05,0.1)")
        if methods is not None and method not in methods:
            raise ValueError(f"--sweep {spec!r}: method {method!r} is not among the evaluated methods {list(methods)}")
        if method == "none":
            raise ValueError(f"--sweep {spec!r}: 'none' has no settings")
        parsed = [parse_value(v, f"--sweep {spec!r}") for v in tail.split(",")]
        values.setdefault(method, {}).setdefault(key, []).extend(parsed)
    sweeps = {}
    for method, options in values.items():
        keys = list(options)
        grid = [dict(zip(keys, combo)) for combo in itertools.product(*options.values())]
        sweeps[method] = [{}] + [g for g in grid if g]
    return sweeps


def settings_of(method: str, settings: Settings | None) -> list[dict]:
    """The settings evaluated for ``method``: its sweep (default first), or just the default."""
    chosen = list((settings or {}).get(method) or [{}])
    labels = [setting_label(s) for s in chosen]
    if len(set(labels)) != len(labels):
        raise ValueError(f"settings of {method!r} repeat: {labels}")
    return chosen


def format_value(value) -> str:
    if isinstance(value, tuple):
        return ":".join("" if v is None else str(v) for v in value)
    if isinstance(value, float):
        return f"{value:g}"
    return str(value).lower() if value is None or isinstance(value, bool) else str(value)


def setting_label(options: Mapping) -> str:
    """``{"alpha": 0.05, "lmbda": 1.0}`` -> ``"alpha=0.05 lmbda=1"``; ``{}`` -> ``"default"``.

    Keys in sorted order, so one setting always has one label (rows are matched by it).
    """
    if not options:
        return DEFAULT
    return " ".join(f"{k}={format_value(options[k])}" for k in sorted(options))


def setting_slug(label: str) -> str:
    """A folder name for a setting's images: ``alpha=0.05 lmbda=1`` -> ``alpha=0.05_lmbda=1``."""
    return re.sub(r"[^A-Za-z0-9=._+-]", "-", label.replace(" ", "_"))


def controls_for(method: str, layout, options: Mapping) -> list:
    """The method's controls for ``layout`` with ``options``; what is left out, the control
    resolves from the model's defaults (MAG, swap) or the published ones (baselines) when
    the run starts."""
    from ..methods import make_controls

    try:
        return make_controls(method, layout, **options)
    except TypeError as error:  # e.g. a step range of the wrong kind: the message says what to write
        raise ValueError(f"method {method!r}, options {dict(options)}: {error}") from None
