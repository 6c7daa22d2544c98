"""Write a tiny random-weight model folder, the stand-in for a real model in the "Colab configuration".

    python -m mag_explore.testing.folders sd15 --out /tmp/tiny-sd15
    MAG_EXPLORE_MODEL=/tmp/tiny-sd15 MAG_EXPLORE_DTYPE=fp16 jupyter lab notebooks/

On Colab a user sets ``MAG_EXPLORE_MODEL`` to a model and gets it in float16 on a GPU. A tiny
folder of the same family, loaded with ``MAG_EXPLORE_DTYPE=fp16`` on the CPU, runs the same
code path (``load_pipeline``, the family's pipeline class, half-precision weights) in seconds,
so CI checks that path without a GPU. Kinds: sd15, sdxl (UNets), flux, sd3 (MMDiT; notebook 08
reads them from ``MAG_EXPLORE_FLUX``). The weights are random: only the course's claims about
a trained model's pictures do not hold on them (``course.Claims`` says so where they are made).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _builders() -> dict:
    from . import mmdit, unet

    return {"sd15": unet.tiny_sd15_pipeline, "sdxl": unet.tiny_sdxl_pipeline,
            "flux": mmdit.tiny_flux_pipeline, "sd3": mmdit.tiny_sd3_pipeline}


KINDS = ("sd15", "sdxl", "flux", "sd3")


def write_tiny_folder(kind: str, out: str | Path, seed: int = 0) -> Path:
    """Save the tiny ``kind`` pipeline to ``out`` (diffusers format, safetensors, fp32 weights;
    ``load_pipeline(out, dtype="fp16")`` casts them). Returns the folder."""
    if kind not in KINDS:
        raise ValueError(f"kind={kind!r} is not a tiny model; kinds: {', '.join(KINDS)}")
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"--out {out} is not empty; give a new or empty folder")
    out.mkdir(parents=True, exist_ok=True)
    _builders()[kind](out, seed=seed)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mag_explore.testing.folders",
                                     description="Write a tiny random-weight model folder (SD 1.5, SDXL, Flux.1, SD3).")
    parser.add_argument("kind", help=f"one of {', '.join(KINDS)}")
    parser.add_argument("--out", required=True, help="a new or empty folder")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        folder = write_tiny_folder(args.kind, args.out, args.seed)
    except (ValueError, FileExistsError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(folder)
    return 0


if __name__ == "__main__":
    sys.exit(main())
