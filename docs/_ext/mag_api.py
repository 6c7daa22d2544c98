"""Sphinx extension: the API reference, one page per module or package that declares ``__all__``.

Nothing here names a module: the package is walked with ``pkgutil`` each build, so a module that
is added, moved or renamed gets its page (and a removed one loses it) without editing the docs.
Every name in an ``__all__`` gets an autodoc entry. A name exported from several places (``generate``
is in ``mag_explore`` and ``mag_explore.sampling``) is indexed once, at its first place in walking
order (the top-level package first), and listed without an index entry elsewhere.

Docstrings are written for ``help()`` as much as for Sphinx. One that is not valid reStructuredText
is shown verbatim (a literal block) instead of failing the ``-W`` build or rendering garbled.
"""
from __future__ import annotations

import importlib
import inspect
import pkgutil
import re
from pathlib import Path

from docutils.core import publish_doctree
from docutils.utils import Reporter

DOCS = Path(__file__).resolve().parents[1]
PACKAGE = "mag_explore"
SKIP = {"__main__"}  # running a module, not a module to document


def public_modules(package: str = PACKAGE) -> list[tuple[str, object]]:
    """(name, module) of the package and every submodule that declares ``__all__``, package first."""
    root = importlib.import_module(package)
    found = [(package, root)]
    for info in pkgutil.walk_packages(root.__path__, prefix=f"{package}."):
        if info.name.rsplit(".", 1)[-1] in SKIP:
            continue
        module = importlib.import_module(info.name)
        if hasattr(module, "__all__"):
            found.append((info.name, module))
    return [(name, module) for name, module in found if hasattr(module, "__all__")]


def _directive(obj) -> str:
    if inspect.isclass(obj):
        return "autoclass"
    if inspect.isfunction(obj) or inspect.isbuiltin(obj) or callable(obj) and not inspect.ismodule(obj):
        return "autofunction"
    return "autodata"


def module_page(name: str, module, seen: set[int]) -> str:
    """The MyST source of one module's reference page; ``seen`` holds the objects indexed already."""
    lines = [f"# `{name}`", "", "```{eval-rst}", f".. automodule:: {name}", "   :no-members:", ""]
    for public in module.__all__:
        obj = getattr(module, public)
        directive = _directive(obj)
        lines.append(f".. {directive}:: {name}.{public}")
        if directive == "autoclass":
            lines.append("   :members:")
        # the same class or function is indexed on an earlier page (by identity: for data, equal
        # small values share an identity, and their full names never collide anyway)
        if directive != "autodata" and id(obj) in seen:
            lines.append("   :no-index:")
        elif inspect.ismodule(obj):  # a submodule in a package's __all__: indexed on its own page
            lines.append("   :no-index:")
        seen.add(id(obj))
        lines.append("")
    lines.append("```")
    return "\n".join(lines) + "\n"


def write_reference(out: Path = DOCS / "gen" / "api") -> list[str]:
    """Write one page per public module and the index; returns the module names."""
    from mag_course import write_if_changed

    seen: set[int] = set()
    modules = public_modules()
    names = []
    for name, module in modules:
        write_if_changed(out / f"{name}.md", module_page(name, module, seen))
        names.append(name)
    for stale in out.glob("*.md"):
        if stale.stem not in names and stale.name != "index.md":
            stale.unlink()
    toc = "\n".join(names)
    summary = "\n".join(f"| [`{n}`]({n}.md) | {len(m.__all__)} | {_first_line(m)} |" for n, m in modules)
    write_if_changed(out / "index.md", f"""# API reference

Generated from the docstrings of every public name: each module or package that declares
`__all__` has a page, and every name in its `__all__` an entry. `help(name)` in Python shows the
same text.

| module | public names | what it is |
| --- | ---: | --- |
{summary}

```{{toctree}}
:hidden:
{toc}
```
""")
    return names


def _first_line(module) -> str:
    doc = (module.__doc__ or "").strip().splitlines()
    return doc[0].replace("|", "\\|") if doc else ""


SPHINX_ROLE = re.compile(r":(?:\w+:)+`([^`]+)`")


def _is_valid_rst(text: str) -> bool:
    """True if docutils parses ``text`` without a warning. Sphinx's roles (``:func:`x```) are read
    as literals here: inside a Sphinx build docutils would call them without Sphinx's context.
    A docstring docutils cannot parse at all is left to Sphinx, which reports it."""
    try:
        tree = publish_doctree(SPHINX_ROLE.sub(r"``\1``", text),
                               settings_overrides={"report_level": Reporter.SEVERE_LEVEL + 1,
                                                   "halt_level": Reporter.SEVERE_LEVEL + 1})
    except Exception:  # noqa: BLE001 - a directive of Sphinx's; Sphinx itself will judge the text
        return True
    # messages of transforms (an undefined |substitution|) are kept apart from the tree's own
    messages = [*tree.findall(lambda n: n.tagname == "system_message"), *tree.transform_messages]
    for message in messages:
        text_of = message.astext()
        if message["level"] >= Reporter.WARNING_LEVEL and "Unknown interpreted text role" not in text_of \
                and "Unknown directive type" not in text_of and 'No role entry for' not in text_of \
                and 'No directive entry for' not in text_of:
            return False
    return True


def verbatim_if_not_rst(app, what, name, obj, options, lines) -> None:
    if lines and not _is_valid_rst("\n".join(lines)):
        lines[:] = ["::", ""] + [f"    {line}" for line in lines] + [""]


def reread_reference(app, env, added, changed, removed) -> list[str]:
    """Sphinx does not know that a reference page depends on the package's docstrings: read every
    one again in each build (seconds), so a cached build never shows a stale docstring, and the
    -W check sees every docstring every time."""
    return [name for name in env.found_docs if name.startswith("gen/api/")]


def setup(app):
    app.connect("builder-inited", lambda app: write_reference())
    app.connect("env-get-outdated", reread_reference)
    app.connect("autodoc-process-docstring", verbatim_if_not_rst)
    return {"parallel_read_safe": True, "version": "1"}
