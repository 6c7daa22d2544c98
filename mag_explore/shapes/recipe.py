"""One seeded command that rebuilds the shipped shapes model: its training runs, in order.

    python -m mag_explore.shapes.recipe --out mag_explore/data/models/shapes --workdir checkpoints/recipe

The shipped weights were trained in stages, each continuing from the model the previous one
exported (``--init-from``; the VAE is trained once, in stage 1); then its decoder alone was
sharpened (``train_decoder``, encoder frozen). Every stage has a fixed step
count and draws its data from seeds fixed by the step, so this command repeats them exactly;
bit-for-bit equality also needs the same thread count and CPU (float sums are not associative).
On 2 CPU cores the whole recipe takes about 3 hours (the decoder stage 36 min of it; on a GPU, minutes); ``--resume`` continues a stage that was
interrupted (each stage checkpoints to its own folder under ``--workdir``).
"""
from __future__ import annotations

import argparse
from pathlib import Path

from . import train, train_decoder

# The options of each stage; the first trains the VAE and then the UNet and text encoder from
# scratch, each later one continues from the model the stage before it exported.
# README, "The embedded model", says what each stage is for and what it measured.
STAGES: tuple[tuple[str, ...], ...] = (
    ("--grounding", "0", "--unet-steps", "2346"),
    ("--pool", "12800", "--grounding", "0.05", "--unet-steps", "4787"),
)


# Last, the decoder alone is sharpened (encoder frozen) in the exported folder.
DECODER_OPTIONS: tuple[str, ...] = ("--steps", "3000")


def decoder_command(out: Path, workdir: Path, threads: int, resume: bool) -> list[str]:
    """The argument list of ``train_decoder.main``: only ``out`` gets the decoder (shapes_flux
    gets the same one from ``python -m mag_explore.shapes.train_decoder``'s default ``--also``)."""
    argv = ["--model", str(out), "--also", "--workdir", str(workdir / "decoder_checkpoints"),
            "--threads", str(threads), *DECODER_OPTIONS]
    return argv + (["--resume"] if resume else [])


def stage_commands(out: Path, workdir: Path, threads: int, device: str,
                   resume: bool) -> list[list[str]]:
    """The argument list of ``train.main`` for each stage; the last one exports to ``out``."""
    commands, previous = [], None
    for i, options in enumerate(STAGES, start=1):
        stage_out = out if i == len(STAGES) else workdir / f"stage{i}"
        argv = ["--out", str(stage_out), "--workdir", str(workdir / f"stage{i}_checkpoints"),
                "--threads", str(threads), "--device", device, *options]
        if previous is not None:
            argv += ["--init-from", str(previous)]
        if resume:
            argv.append("--resume")
        commands.append(argv)
        previous = stage_out
    return commands


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("mag_explore/data/models/shapes"))
    p.add_argument("--workdir", type=Path, default=Path("checkpoints/recipe"))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--resume", action="store_true", help="continue each stage from its checkpoint")
    args = p.parse_args(argv)
    for i, command in enumerate(stage_commands(args.out, args.workdir, args.threads, args.device,
                                               args.resume), start=1):
        print(f"stage {i} of {len(STAGES) + 1}: python -m mag_explore.shapes.train {' '.join(command)}")
        train.main(command)
    command = decoder_command(args.out, args.workdir, args.threads, args.resume)
    print(f"stage {len(STAGES) + 1} of {len(STAGES) + 1}: python -m mag_explore.shapes.train_decoder {' '.join(command)}")
    train_decoder.main(command)


if __name__ == "__main__":
    main()
