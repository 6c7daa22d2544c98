"""The slide-ready figures shown on the site (docs/howto/slides.md), made by the code of today.

One run of the embedded model with MAG and an attention store, then the exports a teacher would
make from it: ``plots.save_animation`` (GIF, and MP4 where ffmpeg exists) and ``plots.save_slide``.
They are remade only when the package changed (its digest, as for the executed notebooks).
"""
from __future__ import annotations

import shutil
from pathlib import Path

DOCS = Path(__file__).resolve().parents[1]
OUT = DOCS / "gen" / "slides"


def build_slides(app=None) -> None:
    from mag_explore.course import nbcache

    stamp = OUT / "package.digest"
    digest = f"{nbcache.package_digest()} ffmpeg={bool(shutil.which('ffmpeg'))}"
    if stamp.exists() and stamp.read_text() == digest and (OUT / "attention.gif").exists():
        return
    import matplotlib

    matplotlib.use("Agg")  # no window: this runs inside the Sphinx build
    import mag_explore as mx
    from mag_explore import plots

    pipe = mx.load_pipeline("shapes")
    defaults = mx.model_defaults(pipe)
    # the demo's layout (make demo): objects low in the image, where the model never puts them itself
    layout = mx.Layout.from_json(mx.data_path("layouts", "bottom_half.json")).for_generation(
        defaults["height"], defaults["width"])
    word = layout.labels[0]
    result = mx.generate(pipe, layout.prompt, controls=[mx.MaskedAttentionGuidance(layout)],
                         store=mx.AttentionStore(), seed=1, progress=False)
    OUT.mkdir(parents=True, exist_ok=True)
    plots.save_animation(result, word, OUT / "attention.gif")
    (OUT / "attention.mp4").unlink(missing_ok=True)
    if shutil.which("ffmpeg"):
        plots.save_animation(result, word, OUT / "attention.mp4")
        note = "The same as an MP4 (H.264, for slide software): {download}`attention.mp4 </gen/slides/attention.mp4>`."
    else:  # a page must not link a file that is not there (the build treats that as an error)
        note = "*(No MP4 here: ffmpeg was not installed where this site was built.)*"
    (OUT / "mp4.md").write_text(note + "\n")
    plots.save_slide(plots.plot_token_maps(result), OUT / "slide.png")
    (OUT / "word.txt").write_text(word)
    stamp.write_text(digest)
