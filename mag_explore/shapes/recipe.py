"""One seeded command that rebuilds the shipped shapes model: its training runs, in order.

    python -m mag_explore.shapes.recipe --out mag_explore/data/models/shapes --workdir checkpoints/recipe

Three stages: (1) ``train --unet-steps 0`` trains the VAE alone (300 steps); (2)
``train_decoder`` sharpens its decoder with the encoder frozen; (3) ``train --vae-from``
trains the UNet and text encoder from scratch on that VAE's latents, with the token grounding
loss from the first step. Every stage has a fixed step count and draws its data from seeds
fixed by the step, so this command repeats them exactly; bit-for-bit equality also needs the
same thread count and CPU (float sums are not associative; the shipped stage 3 ran on one
thread). On 2 CPU cores the recipe takes about 3 hours (stage 1 15 min, stage 2 36 min, stage
3 about 2 h 10 min; on a GPU, minutes); ``--resume`` continues a stage that was interrupted
(each stage checkpoints to its own folder under ``--workdir``). The VAE that shapes_flux was
trained on is the one of stage 1, so it stays valid for both embedded models.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from . import train, train_decoder

# README, "The embedded model", says what each stage is for and what it measured.
VAE_OPTIONS: tuple[str, ...] = ("--unet-steps", "0")
DECODER_OPTIONS: tuple[str, ...] = ("--steps", "3000")
UNET_OPTIONS: tuple[str, ...] = ("--grounding", "0.05", "--unet-steps", "11000", "--pool", "25600",
                                 "--object-counts", "0.2", "0.4", "0.4", "--lr-schedule", "cosine")


def stage_commands(out: Path, workdir: Path, threads: int, device: str,
                   resume: bool) -> list[tuple[str, list[str]]]:
    """(module, argument list) of each stage: the VAE goes to ``workdir/vae``, its decoder is
    sharpened there (and in no other folder), and the UNet trained on it is exported to ``out``."""
    vae_folder = workdir / "vae"
    again = ["--resume"] if resume else []
    common = ["--threads", str(threads), "--device", device]
    return [
        ("train", ["--out", str(vae_folder), "--workdir", str(workdir / "vae_checkpoints"),
                   *common, *VAE_OPTIONS, *again]),
        ("train_decoder", ["--model", str(vae_folder), "--also", "--workdir",
                           str(workdir / "decoder_checkpoints"), "--threads", str(threads),
                           *DECODER_OPTIONS, *again]),
        ("train", ["--out", str(out), "--workdir", str(workdir / "unet_checkpoints"),
                   "--vae-from", str(vae_folder), *common, *UNET_OPTIONS, *again]),
    ]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("mag_explore/data/models/shapes"))
    p.add_argument("--workdir", type=Path, default=Path("checkpoints/recipe"))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--resume", action="store_true", help="continue each stage from its checkpoint")
    args = p.parse_args(argv)
    stages = stage_commands(args.out, args.workdir, args.threads, args.device, args.resume)
    for i, (module, command) in enumerate(stages, start=1):
        print(f"stage {i} of {len(stages)}: python -m mag_explore.shapes.{module} {' '.join(command)}")
        {"train": train.main, "train_decoder": train_decoder.main}[module](command)


if __name__ == "__main__":
    main()
