"""Run, time and strip the course notebooks (needs the ``test`` extra: nbclient, nbformat, ipykernel).

    python -m mag_explore.course.nbtools time  notebooks/*.ipynb   # execute each, print wall and kernel CPU seconds
    python -m mag_explore.course.nbtools strip notebooks/*.ipynb   # drop outputs before committing

Notebooks run with their own folder as the working directory, in a fresh kernel that
inherits this process's environment (so ``MAG_EXPLORE_MODEL`` / ``MAG_EXPLORE_STEPS``
reach the parameters cell).
"""
from __future__ import annotations

import argparse
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mag_explore.course.nbtools", description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=("time", "strip"))
    parser.add_argument("notebooks", nargs="+", type=Path)
    args = parser.parse_args(argv)
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
