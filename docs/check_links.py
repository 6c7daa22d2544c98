"""Check the internal links of the built site, offline: every href and src of every page that
points inside the site must name a file that exists, and a #fragment an id on that page.

    python docs/check_links.py docs/_build/html

(Sphinx's linkcheck builder needs the internet for external links and does not check a
page's own anchors; this does the part a site shipped offline needs.) Exit status 1 lists
each broken link with the page it is on.
"""
from __future__ import annotations

import sys
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

EXTERNAL = ("http:", "https:", "mailto:", "data:", "javascript:", "ftp:")


class _Page(HTMLParser):
    def __init__(self):
        super().__init__()
        self.links: list[str] = []
        self.ids: set[str] = set()

    def handle_starttag(self, tag, attrs):
        for name, value in attrs:
            if name in ("id", "name") and value:
                self.ids.add(value)
            if value and (name == "src" or (name == "href" and tag in ("a", "link", "area"))):
                self.links.append(value)


def _parse(path: Path, cache: dict) -> _Page:
    if path not in cache:
        page = _Page()
        page.feed(path.read_text(errors="replace"))
        cache[path] = page
    return cache[path]


def broken_links(site: Path) -> list[str]:
    site = site.resolve()
    cache: dict[Path, _Page] = {}
    broken = []
    for page_path in sorted(site.rglob("*.html")):
        for link in _parse(page_path, cache).links:
            if link.lower().startswith(EXTERNAL) or link.startswith("//"):
                continue
            parts = urlsplit(link)
            target = page_path if not parts.path else (page_path.parent / unquote(parts.path)).resolve()
            if target.is_dir():
                target = target / "index.html"
            where = f"{page_path.relative_to(site)}: {link}"
            if site not in target.parents and target != site:
                broken.append(f"{where} (outside the site)")
            elif not target.exists():
                broken.append(f"{where} (no such file)")
            elif parts.fragment and target.suffix == ".html" and unquote(parts.fragment) not in _parse(target, cache).ids:
                broken.append(f"{where} (no anchor #{parts.fragment})")
    return broken


def main(argv: list[str]) -> int:
    site = Path(argv[0] if argv else "docs/_build/html")
    if not (site / "index.html").exists():
        print(f"{site}: no built site (make docs)")
        return 1
    broken = broken_links(site)
    for line in broken:
        print(line)
    print(f"{len(list(site.rglob('*.html')))} pages checked, {len(broken)} broken internal link(s)")
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
