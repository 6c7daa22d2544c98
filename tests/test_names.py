"""One name per idea: the old names of renamed ideas appear nowhere (code, tests, bench, notebooks,
README, docs, the embedded models' settings).

    step rule        step= / mag_step / rule       ->  step_rule, settings key mag_step_rule, --step-rule
    λ                mag_lambda                    ->  lmbda, settings key mag_lmbda, --lmbda
    threshold        guide_until, --guide-until    ->  while_t_above, settings key while_t_above,
                     --swap-until                      --guide-while-t-above, --swap-while-t-above
    layer sizes      resolutions=, mag_resolutions ->  layer_sizes=, settings key mag_layer_sizes
    (h, w) grid      .resolution(), ctx.resolution ->  .grid(), ctx.grid, attention_grid, grids_seen
    installing hooks families.attention_hooks()    ->  families.install_attention_hooks()
                     (``Control.attention_hooks()`` still lists a control's hooks)
    a step's controller  state.attention           ->  state.attention_controller
    the learner's pass   inputs.attention(x, e)    ->  inputs.attention_of(x, e)
    the guidance pass    guidance_step             ->  guidance_pass (returns L, ∇L; the update is in before_step)
    modules              mag_explore.tokens, .exercises, ... ->  mag_explore.text.tokens, .course.exercises, ...
"""
import json
import re
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parent.parent
OLD = {
    "step rule as step=": r"\bstep=[\"'](official|normalized)[\"']",
    "mag_step setting": r"\[[\"']mag_step[\"']\]|[\"']mag_step[\"']\s*:|`mag_step`",  # not the solution mag_step()
    "LearnerMAG.rule": r"\.rule\b",
    "mag_lambda": r"\bmag_lambda\b",
    "guide_until": r"\bguide_until\b|--guide-until\b|\bswap_until\b|--swap-until\b",
    "resolutions": r"\bresolutions\b|\bmag_resolutions\b",
    "resolution (h, w)": r"\.resolution\(|\bctx\.resolution\b|\battention_resolution\b|\bresolutions_seen\b",
    "families.attention_hooks": r"\bfamilies\.attention_hooks\(|def attention_hooks\(self, pipe",
    "state.attention": r"\bstate\.attention\b(?!_)",
    "inputs.attention": r"\b(step|inputs)\.attention\(",
    "guidance_step": r"\bguidance_step\b",
    "removed keywords": r"\breject_old_keywords\b|\*\*removed\b",
    "modules moved into folders": r"\bmag_explore[./](tokens|bpe|t5_tokens|text_keys|inversion|model_files|metrics|suites"
                                  r"|course_joint|exercises|checking|learner|solutions|nbtools|testing_\w+)\b"
                                  r"|\bmx\.(tokens|inversion|exercises|solutions)\."
                                  r"|from mag_explore import [\w, ]*\b(tokens|exercises|solutions|course_joint|inversion)\b",
}
HERE = Path(__file__).resolve()


def code_spans(markdown: str) -> str:
    return "\n".join(re.findall(r"`[^`\n]+`", markdown))


def texts() -> dict[str, str]:
    """Every place a name can be written: code in full, notebooks' code cells, and docs' code spans."""
    found = {}
    for pattern in ("mag_explore/**/*.py", "tests/*.py", "bench/*.py"):
        found |= {str(p.relative_to(ROOT)): p.read_text() for p in ROOT.glob(pattern) if p != HERE}
    for path in ROOT.glob("notebooks/*.ipynb"):
        cells = nbformat.read(path, as_version=4).cells
        found[str(path.relative_to(ROOT))] = "\n".join(
            c.source if c.cell_type == "code" else code_spans(c.source) for c in cells)
    for path in [ROOT / "README.md", *ROOT.glob("docs/*.md")]:
        found[str(path.relative_to(ROOT))] = code_spans(path.read_text())
    for path in ROOT.glob("mag_explore/data/models/*/mag_explore.json"):
        found[str(path.relative_to(ROOT))] = "\n".join(f'"{key}"' for key in json.loads(path.read_text()))
    return found


TEXTS = texts()


def test_the_search_sees_every_kind_of_file():  # a guard on the test itself
    kinds = {Path(name).suffix for name in TEXTS}
    assert {".py", ".ipynb", ".md", ".json"} <= kinds
    assert re.search(OLD["resolutions"], "AttentionStore(resolutions={8})")
    assert not re.search(OLD["state.attention"], "state.attention_controller.phase_as")


@pytest.mark.parametrize("idea", sorted(OLD))
def test_old_names_are_gone(idea):
    hits = [f"{name}:{text[:m.start()].count(chr(10)) + 1}: {m.group(0)}"
            for name, text in TEXTS.items() for m in re.finditer(OLD[idea], text)]
    assert not hits, f"old name for {idea!r}: {hits[:10]}"
