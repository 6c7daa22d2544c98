"""Run, time and strip the course notebooks (needs the ``test`` extra: nbclient, nbformat, ipykernel).

    python -m mag_explore.course.nbtools time  notebooks/*.ipynb   # execute each, print wall and kernel CPU seconds
    python -m mag_explore.course.nbtools strip notebooks/*.ipynb   # drop outputs before committing
    python -m mag_explore.course.nbtools links [--check]           # Colab links from pyproject.toml

Notebooks run with their own folder as the working directory, in a fresh kernel that
inherits this process's environment (so ``MAG_EXPLORE_MODEL`` / ``MAG_EXPLORE_STEPS``
reach the parameters cell).
"""
from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path


def _nbformat():
    try:
        import nbformat
    except ImportError as error:  # pragma: no cover - a clear message instead of a bare ImportError
        raise ImportError("the notebook tools need nbformat and nbclient: pip install -e '.[test]'") from error
    return nbformat


def kernel_cpu_seconds() -> float:
    """CPU seconds (user + system) of this process's finished children, e.g. the kernels it ran."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_notebook(path: str | Path, cell_timeout: int = 600, kernel_name: str = "python3"):
    """Execute a notebook top to bottom; returns (executed notebook, seconds). A failing cell raises."""
    from nbclient import NotebookClient

    path = Path(path)
    nb = _nbformat().read(path, as_version=4)
    client = NotebookClient(nb, timeout=cell_timeout, kernel_name=kernel_name,
                            resources={"metadata": {"path": str(path.parent)}})
    start = time.perf_counter()
    client.execute()
    return nb, time.perf_counter() - start


def outputs_of(nb) -> list[str]:
    """What a notebook carries besides its source: cells with outputs or counts, saved widget state."""
    found = [f"cell {i}: {len(c.get('outputs', []))} output(s), execution_count {c.get('execution_count')}"
             for i, c in enumerate(nb.cells)
             if c.cell_type == "code" and (c.get("outputs") or c.get("execution_count") is not None)]
    if "widgets" in nb.metadata:
        found.append("metadata: saved widget state")
    return found


def strip(path: str | Path) -> bool:
    """Remove outputs, execution counts and saved widget state in place; True if the file changed."""
    nbformat = _nbformat()
    path = Path(path)
    nb = nbformat.read(path, as_version=4)
    if not outputs_of(nb):
        return False
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    nb.metadata.pop("widgets", None)
    nbformat.write(nb, path)
    return True


ROOT = Path(__file__).resolve().parents[1]
#: A README Colab link or a setup cell's ``REPO = "..."`` line, whatever repository they name now.
COLAB_LINK = re.compile(r"https://colab\.research\.google\.com/github/[^/\s]+/[^/\s]+/blob/[^/\s]+/notebooks/")
REPO_LINE = re.compile(r'(REPO = \\")[^"\\]*(\\")[^"]*?(\\n")')


def repository_url(root: Path = ROOT) -> str:
    """``[project.urls] Repository`` of pyproject.toml: the one place a fork names itself."""
    text = (root / "pyproject.toml").read_text()
    try:
        import tomllib
        url = tomllib.loads(text)["project"]["urls"]["Repository"]
    except ImportError:  # Python 3.10: no tomllib; the line is simple enough to read directly
        url = re.search(r'^Repository\s*=\s*"([^"]+)"', text, re.M).group(1)
    return url.rstrip("/").removesuffix(".git")


def colab_url(notebook: str, root: Path = ROOT, branch: str = "main") -> str:
    """The Open-in-Colab address of ``notebooks/<notebook>`` in the repository of pyproject.toml."""
    owner_name = repository_url(root).split("github.com/", 1)[1]
    return f"https://colab.research.google.com/github/{owner_name}/blob/{branch}/notebooks/{notebook}"


def links(root: Path = ROOT, check: bool = False) -> list[Path]:
    """Point the README's Colab links and every notebook's setup cell at pyproject's repository.

    Returns the files that disagreed (rewritten, unless ``check``). The notebooks are edited as
    text, one line of their first code cell, so nothing else in them moves.
    """
    url = repository_url(root)
    colab = colab_url("", root)
    comment = "  # from pyproject.toml ([project.urls] Repository): `make links` rewrites it"
    changed = []
    for path in [root / "README.md", *sorted((root / "notebooks").glob("*.ipynb"))]:
        text = path.read_text()
        if path.suffix == ".md":
            new = COLAB_LINK.sub(colab, text)
        else:
            new = REPO_LINE.sub(lambda m: f'{m[1]}{url}{m[2]}{comment}{m[3]}', text, count=1)
        if new != text:
            changed.append(path)
            if not check:
                path.write_text(new)
    return changed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mag_explore.course.nbtools", description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=("time", "strip", "links"))
    parser.add_argument("notebooks", nargs="*", type=Path)
    parser.add_argument("--check", action="store_true", help="links: only report files that disagree")
    args = parser.parse_args(argv)
    if args.command == "links":
        changed = links(check=args.check)
        for path in changed:
            print(f"{path.relative_to(ROOT)}: {'disagrees with' if args.check else 'rewritten from'} pyproject.toml")
        return 1 if (args.check and changed) else 0
    if args.command == "strip":
        for path in args.notebooks:
            print(f"{path}: {'stripped' if strip(path) else 'clean'}")
        return 0
    # Wall time depends on what else the machine runs; the kernel's CPU time does not, and for a
    # one-thread kernel (mx.use_cpu_threads) it is what the wall time is on an idle machine.
    total = cpu_total = 0.0
    for path in sorted(args.notebooks):
        before = kernel_cpu_seconds()
        _, seconds = run_notebook(path)
        cpu = kernel_cpu_seconds() - before
        total, cpu_total = total + seconds, cpu_total + cpu
        print(f"{path.name:<40} {seconds:7.1f} s wall {cpu:7.1f} s CPU", flush=True)
    print(f"{'total':<40} {total:7.1f} s wall {cpu_total:7.1f} s CPU")
    return 0


if __name__ == "__main__":
    sys.exit(main())
