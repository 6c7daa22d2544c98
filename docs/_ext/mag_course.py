"""Sphinx extension: the course pages, the syllabus and the slide examples, written to docs/gen/.

Each notebook of ``notebooks/`` comes from the cache of executed notebooks (``mag_explore.course.nbcache``):
run only when its key changed, or adopted from the test run's copies (``MAG_EXPLORE_EXECUTED_DIR``).
``MAG_EXPLORE_DOCS_EXECUTE=0`` makes a notebook missing from the cache an error instead (CI: the
test run has executed them already, and running them twice would cost minutes).
``MAG_EXPLORE_DOCS_NOTEBOOKS`` (a glob, e.g. ``"0[0-2]*"``) builds the course from some notebooks
only, for a quick look while writing; the syllabus then lists only those.

The page of a notebook is the executed notebook plus one cell under its title: goals, time,
prerequisites, exercises and the Colab link, read from the notebook itself where it says them.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import nbformat

from mag_explore.course import nbcache
from mag_explore.course.nbtools import colab_url

DOCS = Path(__file__).resolve().parents[1]
ROOT = DOCS.parent
GEN = DOCS / "gen"
CACHE = DOCS / "_build" / "nbcache"
#: What each notebook builds on (by number); a notebook not listed builds on the one before it.
PREREQUISITES = {"00": [], "01": ["00"], "02": ["01"], "03": ["01"], "04": ["03"], "05": ["04"],
                 "06": ["04"], "07": ["04"], "08": ["01", "04"], "09": ["01", "04"]}
#: Teaching sessions of about 90 minutes each: the syllabus groups the notebooks by number.
SESSIONS = [("Seeing attention", ("00", "01", "02")), ("Steering it", ("03", "04")),
            ("Measuring, editing, inventing", ("05", "06", "07")), ("Beyond SD 1.5", ("08", "09"))]
WIDGET = "application/vnd.jupyter.widget-view+json"


def write_if_changed(path: Path, text: str) -> None:
    """Sphinx rebuilds a page whose file is newer: leave unchanged files alone."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists() or path.read_text() != text:
        path.write_text(text)


def _field(text: str, name: str) -> str:
    match = re.search(rf"\*\*{name}:\*\*\s*(.+?)(?:\n\s*\n|$)", text, re.S)
    return " ".join(match[1].split()) if match else ""


def notebook_info(path: Path) -> dict:
    """What the course page and the syllabus say about a notebook, read from the notebook."""
    nb = nbformat.read(path, as_version=4)
    title_cell = nb.cells[0].source
    title = title_cell.splitlines()[0].lstrip("# ").strip()
    paragraphs = [p for p in title_cell.split("\n\n")[1:] if p.strip() and not p.startswith("**Time")]
    goals = _field(title_cell, "What you learn") or " ".join(" ".join(paragraphs[:1]).split())
    code = [c.source for c in nb.cells if c.cell_type == "code"]
    learner = sorted({name for src in code if "raise NotImplementedError" in src
                      for name in re.findall(r"^def (\w+)\(", src, re.M)})
    checks = sorted({name for src in code for name in re.findall(r"exercises\.(check_\w+)\(", src)})
    number = path.stem[:2]
    before = f"{int(number) - 1:02d}" if number.isdigit() and int(number) > 0 else None
    return {"path": path, "number": number, "title": title, "goals": goals, "time": _field(title_cell, "Time"),
            "goals_stated": bool(_field(title_cell, "What you learn")),
            "learner": learner, "checks": checks,
            "prerequisites": PREREQUISITES.get(number, [before] if before else [])}


def _glance(info: dict, infos: dict) -> str:
    """The cell under the title. Goals and time are repeated only where the title cell does not
    already say them in the course's words ("What you learn", "Time")."""
    prereq = ", ".join(f"[{infos[n]['title']}]({infos[n]['path'].name})" for n in info["prerequisites"]
                       if n in infos) or "none: start here"
    wrote = ", ".join(f"`{name}`" for name in info["learner"]) or "no function of the course's core"
    checks = ", ".join(f"`exercises.{name}`" for name in info["checks"]) or "none"
    lines = [":::{admonition} At a glance", ":class: tip", ""]
    if not info["goals_stated"]:
        lines += [f"**Goals:** {info['goals']}", ""]
    if not info["time"]:
        lines += ["**Time:** see the notebook", ""]
    lines += [f"**Prerequisites:** {prereq}", "",
              f"**Exercises:** you write {wrote}; checked by {checks} (see [For teachers](/teachers.md)).", "",
              f"**Run it yourself:** [Open in Colab]({colab_url(info['path'].name, ROOT)}) · "
              f"or locally `jupyter lab notebooks/{info['path'].name}`", ":::"]
    return "\n".join(lines)


def course_page(executed: Path, info: dict, infos: dict):
    """The executed notebook with its at-a-glance cell, widgets replaced by a note (a static page
    cannot run them, and their saved output is an empty reference to a live kernel)."""
    nb = nbformat.read(executed, as_version=4)
    nb.cells.insert(1, nbformat.v4.new_markdown_cell(_glance(info, infos)))
    for cell in nb.cells:
        for output in cell.get("outputs", []):
            if WIDGET in output.get("data", {}):
                output["data"] = {"text/markdown": "*An interactive widget: it runs in Jupyter or Colab "
                                                   "(the link at the top), not on this page.*"}
    nb.metadata.pop("widgets", None)
    return nb


def syllabus(infos: dict) -> str:
    rows = ["| session | notebook | goals | time | you write (check) |", "| --- | --- | --- | --- | --- |"]
    for number, (name, members) in enumerate(SESSIONS, 1):
        for n in members:
            if n not in infos:
                continue
            info = infos[n]
            wrote = ", ".join(f"`{f}`" for f in info["learner"]) or "—"
            checks = ", ".join(f"`{c}`" for c in info["checks"])
            rows.append(f"| {number}. {name} | [{info['title']}](/gen/course/{info['path'].name}) | {info['goals']} | "
                        f"{info['time']} | {wrote}{f' ({checks})' if checks else ''} |")
    grouped = {n for _, members in SESSIONS for n in members}
    for n, info in sorted(infos.items()):
        if n not in grouped:  # a notebook added later still appears
            rows.append(f"| extra | [{info['title']}](/gen/course/{info['path'].name}) | {info['goals']} | {info['time']} | |")
    return "\n".join(rows) + "\n"


def build_course(app) -> None:
    pattern = os.environ.get("MAG_EXPLORE_DOCS_NOTEBOOKS", "*")
    notebooks = sorted((ROOT / "notebooks").glob(pattern if pattern.endswith(".ipynb") else f"{pattern}.ipynb"))
    infos = {notebook_info(p)["number"]: notebook_info(p) for p in notebooks}
    found = nbcache.executed(notebooks, CACHE, adopt_from=os.environ.get("MAG_EXPLORE_EXECUTED_DIR") or None,
                             jobs=int(os.environ.get("MAG_EXPLORE_DOCS_JOBS", "2")),
                             allow_execute=os.environ.get("MAG_EXPLORE_DOCS_EXECUTE", "1") != "0")
    for path, (executed, how) in found.items():
        print(f"mag_course: {path.name}: {how}")
        info = next(i for i in infos.values() if i["path"] == path)
        text = nbformat.writes(course_page(executed, info, infos))
        write_if_changed(GEN / "course" / path.name, text)
    write_if_changed(GEN / "syllabus.md", syllabus(infos))
    stale = {p.name for p in (GEN / "course").glob("*.ipynb")} - {p.name for p in notebooks}
    for name in stale:  # a notebook removed or renamed leaves no orphan page
        (GEN / "course" / name).unlink()


def setup(app):
    from slide_examples import build_slides

    app.connect("builder-inited", build_course)
    app.connect("builder-inited", build_slides)
    return {"parallel_read_safe": True, "version": "1"}


if __name__ == "__main__":  # print what the pages would say, without building
    for p in sorted((ROOT / "notebooks").glob("*.ipynb")):
        print(json.dumps({k: str(v) for k, v in notebook_info(p).items()}, ensure_ascii=False))
