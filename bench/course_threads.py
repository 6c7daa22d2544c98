"""How many CPU threads the course should use on a shared machine: the notebooks' wall time with
one and with two torch threads, on an idle machine and with the other core busy.

    python bench/course_threads.py                      # notebooks 00-04 and 07 (about 10 minutes)
    python bench/course_threads.py notebooks/04_*.ipynb # any selection

Prints seconds per notebook and configuration, and the ratio busy / idle for each thread count.
"A busy core" is a second process spinning on the CPU, as another user's job on a classroom server.
Threads are set through ``$MAG_EXPLORE_THREADS``, which ``mx.use_cpu_threads`` reads.
"""
from __future__ import annotations

import multiprocessing
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DEFAULT = ["00", "01", "02", "03", "04", "07"]


def spin(stop) -> None:
    while not stop.is_set():
        sum(i * i for i in range(10_000))


def series(paths: list[Path], threads: int) -> dict[str, float]:
    from mag_explore.course.nbtools import run_notebook

    os.environ["MAG_EXPLORE_THREADS"] = str(threads)
    os.environ.pop("OMP_NUM_THREADS", None)  # let torch start with its default, as a user's kernel does
    return {p.stem: run_notebook(p, cell_timeout=3600)[1] for p in paths}


def main() -> None:
    paths = [Path(a) for a in sys.argv[1:]] or sorted(p for p in (ROOT / "notebooks").glob("*.ipynb")
                                                       if p.name[:2] in DEFAULT)
    results = {}
    for busy in (False, True):
        stop = multiprocessing.Event()
        spinner = multiprocessing.Process(target=spin, args=(stop,)) if busy else None
        if spinner:
            spinner.start()
        try:
            for threads in (1, 2):
                start = time.perf_counter()
                results[(busy, threads)] = series(paths, threads)
                print(f"{'busy' if busy else 'idle'}, {threads} thread(s): {time.perf_counter() - start:.0f} s "
                      f"{ {k: round(v) for k, v in results[(busy, threads)].items()} }", flush=True)
        finally:
            if spinner:
                stop.set()
                spinner.join()
    for threads in (1, 2):
        idle, busy = sum(results[(False, threads)].values()), sum(results[(True, threads)].values())
        print(f"{threads} thread(s): idle {idle:.0f} s, other core busy {busy:.0f} s, ratio {busy / idle:.2f}")


if __name__ == "__main__":
    main()
