"""The documentation site: every public name has a reference entry; the built site's internal
links resolve, its figures load in a real browser (Debian's headless Chromium, as in
test_browser.py) and no page shows an error cell.

The reference check needs no build. The others read the site `make docs` built
(``docs/_build/html``, or ``$MAG_EXPLORE_SITE``) and are skipped when there is none, unless
``MAG_EXPLORE_REQUIRE_SITE`` is set (CI builds the site, then runs them: a missing site fails).
"""
import importlib
import os
import pkgutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SITE = Path(os.environ.get("MAG_EXPLORE_SITE") or ROOT / "docs" / "_build" / "html")
CHROMIUM = Path("/usr/bin/chromium")
sys.path[:0] = [str(ROOT / "docs"), str(ROOT / "docs" / "_ext")]

import check_links  # noqa: E402  (docs/check_links.py)
import mag_api  # noqa: E402  (docs/_ext/mag_api.py)


def _public_names() -> list[tuple[str, str]]:
    """(module, name) for every name in the ``__all__`` of mag_explore and of each submodule,
    walked here independently of the reference generator."""
    import mag_explore

    modules = [mag_explore] + [importlib.import_module(info.name) for info in
                               pkgutil.walk_packages(mag_explore.__path__, prefix="mag_explore.")
                               if not info.name.endswith("__main__")]
    return [(m.__name__, name) for m in modules for name in getattr(m, "__all__", [])]


def test_every_public_name_has_a_reference_entry(tmp_path):
    names = _public_names()
    assert len(names) > 50 and ("mag_explore", "generate") in names
    written = mag_api.write_reference(tmp_path)
    pages = {module: (tmp_path / f"{module}.md").read_text() for module in written}
    missing = [f"{module}.{name}" for module, name in names
               if module not in pages or f":: {module}.{name}\n" not in pages[module]]
    assert not missing, f"no reference entry for {missing}"
    index = (tmp_path / "index.md").read_text()
    assert all(module in index for module in pages), "every module page is in the reference's table of contents"


def _site():
    if not (SITE / "index.html").exists():
        if os.environ.get("MAG_EXPLORE_REQUIRE_SITE"):
            pytest.fail(f"no built site in {SITE}, and MAG_EXPLORE_REQUIRE_SITE is set (make docs)")
        pytest.skip(f"no built site in {SITE} (make docs)")
    return SITE


def test_internal_links_resolve():
    assert check_links.broken_links(_site()) == []


def test_every_notebook_has_a_course_page_without_errors():
    site = _site()
    for notebook in sorted((ROOT / "notebooks").glob("*.ipynb")):
        page = site / "gen" / "course" / f"{notebook.stem}.html"
        assert page.exists(), f"no course page for {notebook.name}"
    for page in site.rglob("*.html"):
        # MyST-NB renders a cell's error output as a block of class "output traceback"
        assert "output traceback" not in page.read_text(errors="replace"), f"{page.relative_to(site)} shows an error"


@pytest.mark.slow
@pytest.mark.browser
def test_figures_load_in_chromium():
    site = _site()
    if not CHROMIUM.exists():
        if os.environ.get("MAG_EXPLORE_REQUIRE_BROWSER"):
            pytest.fail(f"{CHROMIUM} is missing, and MAG_EXPLORE_REQUIRE_BROWSER is set")
        pytest.skip(f"{CHROMIUM} is missing (apt-get install -y chromium)")
    from playwright.sync_api import sync_playwright

    from test_browser import CHROMIUM_ARGS

    course_page = sorted((site / "gen" / "course").glob("*.html"))[1]  # 01: figures and an exercise check
    pages = {"index": site / "index.html", "course": course_page, "slides": site / "howto" / "slides.html"}
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        page = browser.new_page()
        for name, path in pages.items():
            page.goto(path.as_uri())
            page.wait_for_load_state("load")
            images = page.evaluate("""() => [...document.images]
                .filter(img => !/^https?:/.test(img.getAttribute('src') || ''))
                .map(img => ({src: img.getAttribute('src'), complete: img.complete, width: img.naturalWidth}))""")
            broken = [i["src"] for i in images if not (i["complete"] and i["width"] > 0)]
            assert not broken, f"{name}: figures that did not load: {broken}"
            if name != "index":
                assert images, f"{name} ({path.name}) shows no figure"
            assert page.locator(".output.traceback").count() == 0, f"{name} shows an error cell"
        browser.close()
