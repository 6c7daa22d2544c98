"""Retrain both embedded models on a lent GPU and measure them, in one device call (≤ 10 minutes).

Issues 12 and 17 wait for better-trained embedded models; on this project's 2-core CPU a long
run takes hours, on one GPU minutes. Prepared so that a session with a GPU runs it at once:

    bash bench/gpu_wheels.sh            # here, once: diffusers as a wheel into .whl/ (the GPU machine has none)
    # device run, carry [".whl"]:
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && \
        PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 python3 bench/gpu_train.py --out $OUT

    python bench/gpu_train.py --smoke --out /tmp/gpu_train   # the same code on the CPU, a few steps (tested)

Both trainings run at once (two processes on one GPU; each is far too small to fill it), each
from scratch with grounding from the first step and a fixed, seeded step count, so the command
printed for each reproduces it. ``--max-minutes`` is only a guard: a run that reaches it stops,
exports what it has and says so (then lower the steps: the schedule assumed the full count).
Then each model is measured where the README measures it: the suite (none and MAG at the model's
defaults, 4 seeds) and the fidelity check. ``$OUT`` gets each model folder as a tar in parts of ≤ 15 MiB
(``cat shapes_flux.tar.* | tar x -C mag_explore/data/models``), ``summary.md`` and ``logs.txt``.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def jobs(args, work: Path) -> dict[str, list[str]]:
    """Each model's training command (module and arguments), as it would be typed."""
    device = ["--device", args.device]
    return {
        "shapes": ["mag_explore.shapes.train", "--out", str(work / "shapes"), "--workdir", str(work / "ckpt_shapes"),
                   "--pool", str(args.pool), "--grounding", "0.05", "--unet-steps", str(args.unet_steps),
                   "--vae-steps", str(args.vae_steps), "--max-minutes", str(args.max_minutes), *device],
        "shapes_flux": ["mag_explore.shapes.train_mmdit", "--out", str(work / "shapes_flux"),
                        "--workdir", str(work / "ckpt_flux"), "--pool", str(args.pool), "--steps", str(args.flux_steps),
                        "--layers", str(args.flux_layers), "--single-layers", str(args.flux_single_layers),
                        "--max-minutes", str(args.max_minutes), *device],
    }


def measure(name: str, folder: Path, args, logs: Path) -> str:
    """The suite (none vs MAG at the folder's defaults) and the model's fidelity check, as markdown."""
    out = folder.parent / f"eval_{name}"
    evaluate = [sys.executable, "-m", "mag_explore", "evaluate", "--model", str(folder), "--methods", "none,mag",
                "--seeds", str(args.seeds), "--out", str(out), "--device", args.device, "--fresh"]
    if args.eval_steps:
        evaluate += ["--num-inference-steps", str(args.eval_steps)]
    if args.smoke:  # the first two layouts of the suite: the plumbing, not the figures
        suite = json.loads((ROOT / "mag_explore" / "data" / "suites" / "shapes.json").read_text())
        suite["layouts"] = suite["layouts"][:2]
        (folder.parent / "suite.json").write_text(json.dumps(suite))
        evaluate += ["--suite", str(folder.parent / "suite.json")]
    run(evaluate, logs / f"eval_{name}.log")
    check = ([sys.executable, "-m", "mag_explore.shapes.check_mmdit", "--model", str(folder), "-n", str(args.check_n),
              "--out", str(folder.parent / f"check_{name}"), "--write"] if name == "shapes_flux" else
             [sys.executable, "-m", "mag_explore.shapes.check", "--model", str(folder), "--images", str(args.check_n),
              "--seeds", "1", "--device", args.device])
    if args.smoke:
        check += ["--steps", "2"] if name == "shapes_flux" else []
    run(check, logs / f"check_{name}.log", allow_failure=True)  # check.py exits 1 when a target is missed
    return (out / "summary.md").read_text()


def run(command: list[str], log: Path, allow_failure: bool = False) -> None:
    with log.open("w") as f:
        done = subprocess.run(command, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
    if done.returncode and not allow_failure:
        raise SystemExit(f"{' '.join(command)} failed ({done.returncode}):\n{log.read_text()[-3000:]}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True, help="$OUT on the device machine")
    p.add_argument("--work", type=Path, default=Path("/tmp/gpu_train"), help="checkpoints and exports")
    p.add_argument("--device", default="cuda")
    p.add_argument("--unet-steps", type=int, default=12000)
    p.add_argument("--vae-steps", type=int, default=300)
    p.add_argument("--flux-steps", type=int, default=15000)
    p.add_argument("--flux-layers", type=int, default=3)
    p.add_argument("--flux-single-layers", type=int, default=6)
    p.add_argument("--pool", type=int, default=12800)
    p.add_argument("--max-minutes", type=float, default=6.0)
    p.add_argument("--seeds", type=int, default=4)
    p.add_argument("--check-n", type=int, default=32)
    p.add_argument("--eval-steps", type=int, default=None)
    p.add_argument("--only", choices=["shapes", "shapes_flux"], default=None, help="train one model only")
    p.add_argument("--smoke", action="store_true", help="CPU, a few steps, 1 seed: checks the plumbing")
    args = p.parse_args(argv)
    if args.smoke:
        args.device, args.unet_steps, args.flux_steps, args.vae_steps, args.pool = "cpu", 2, 2, 2, 64
        args.seeds, args.check_n, args.eval_steps = 1, 2, 4  # 4 steps: the first (t = 751) is guided
    args.work.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    logs = args.work / "logs"  # gathered into $OUT/logs.txt at the end: $OUT brings back 8 files at most
    logs.mkdir(exist_ok=True)
    todo = {k: v for k, v in jobs(args, args.work).items() if args.only in (None, k)}

    start = time.time()
    running = {name: subprocess.Popen([sys.executable, "-m", *command], cwd=ROOT, stderr=subprocess.STDOUT,
                                      stdout=(logs / f"train_{name}.log").open("w"))
               for name, command in todo.items()}
    failed = [name for name, proc in running.items() if proc.wait()]
    minutes = (time.time() - start) / 60
    if failed:
        gather_logs(logs, args.out)
        raise SystemExit(f"training {failed} failed; see logs.txt")

    lines = [f"# gpu_train: {minutes:.1f} min of training on {args.device}", ""]
    for name, command in todo.items():
        folder = args.work / name
        meta = json.loads((folder / "mag_explore.json").read_text())["training"]
        reached, asked = (meta["unet_steps"], args.unet_steps) if name == "shapes" else (meta["steps"], args.flux_steps)
        lines += [f"## {name}", "", "    python -m " + " ".join(command), "",
                  f"steps reached: {reached} (asked {asked})", "", measure(name, folder, args, logs), ""]
        pack(folder, name, args.out)
    (args.out / "summary.md").write_text("\n".join(lines))
    gather_logs(logs, args.out)
    print("\n".join(lines))


PART_BYTES = 15 * 2**20  # a device call brings back files of 16 MiB at most


def pack(folder: Path, name: str, out: Path) -> None:
    """``folder`` as ``name.tar.0``, ``.1``, ... of ≤ 15 MiB each; ``cat name.tar.* | tar x`` unpacks it."""
    whole = folder.parent / f"{name}.tar"
    with tarfile.open(whole, "w") as tar:
        tar.add(folder, arcname=name)
    data = whole.read_bytes()
    for i in range(0, len(data), PART_BYTES):
        (out / f"{name}.tar.{i // PART_BYTES}").write_bytes(data[i:i + PART_BYTES])


def gather_logs(logs: Path, out: Path) -> None:
    with (out / "logs.txt").open("w") as f:
        for log in sorted(logs.glob("*.log")):
            f.write(f"===== {log.name}\n{log.read_text()[-20000:]}\n")  # progress bars make long logs


if __name__ == "__main__":
    main()
