"""Write real.json: the COCO-MIG-like suite for real models (SD 1.5, SDXL, Flux).

36 layouts, 12 each of two, three and four objects; every object is a color and a COCO
noun ("a red car, a blue dog and a green bench") in a box of its own (sides 0.2-0.55 of
the image, smaller with more objects; no two boxes overlap), colors and nouns distinct
within a layout. Made from a fixed seed; no data set is downloaded. The colors are those instance success checks
(``mag_explore.evaluate.real_suite.COLOR_WORDS``; a test keeps the two lists equal).
Run: python mag_explore/data/suites/make_real_suite.py
"""
import json
import random
from pathlib import Path

COLOR_WORDS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white")
#: COCO objects that read well in one word and in any of the colors above
OBJECTS = ("car", "bus", "truck", "bicycle", "motorcycle", "boat", "bench", "chair", "couch", "bed", "cup", "bowl",
           "vase", "bottle", "clock", "umbrella", "suitcase", "backpack", "kite", "dog", "cat", "horse", "bird",
           "apple", "book", "laptop", "handbag")


def random_boxes(rng: random.Random, count: int, tries: int = 10000) -> list[list[float]]:
    """``count`` boxes (x0, y0, x1, y1, relative) that do not overlap, sides from 0.2 to
    0.55 (two boxes), 0.48 (three) or 0.42 (four): smaller where more must fit."""
    largest = 0.55 if count <= 2 else 0.48 if count == 3 else 0.42
    for _ in range(tries):
        boxes = []
        for _ in range(count):
            w, h = rng.uniform(0.2, largest), rng.uniform(0.2, largest)
            x0, y0 = rng.uniform(0.02, 0.98 - w), rng.uniform(0.02, 0.98 - h)
            box = [round(x0, 3), round(y0, 3), round(x0 + w, 3), round(y0 + h, 3)]
            if any(box[0] < b[2] and b[0] < box[2] and box[1] < b[3] and b[1] < box[3] for b in boxes):
                break
            boxes.append(box)
        if len(boxes) == count:
            return boxes
    raise ValueError(f"could not place {count} boxes without overlap in {tries} tries")


def make_real_suite(seed: int = 0, per_count: dict[int, int] | None = None) -> dict:
    """The shipped suite: 12 layouts of each of 2, 3 and 4 objects, distinct objects and colors in each."""
    rng = random.Random(seed)
    layouts = []
    for count, number in (per_count or {2: 12, 3: 12, 4: 12}).items():
        for index in range(number):
            phrases = [f"{c} {o}" for c, o in zip(rng.sample(COLOR_WORDS, count), rng.sample(OBJECTS, count))]
            boxes = random_boxes(rng, count)
            prompt = "a " + ", a ".join(phrases[:-1]) + " and a " + phrases[-1]
            layouts.append({"name": f"{count} objects #{index + 1}", "prompt": prompt, "tags": [f"{count} objects"],
                            "regions": [{"phrase": p, "rect": b} for p, b in zip(phrases, boxes)]})
    return {"about": f"COCO-MIG-like layouts, written by make_real_suite.py (seed {seed})", "layouts": layouts}


if __name__ == "__main__":
    out = Path(__file__).with_name("real.json")
    out.write_text(json.dumps(make_real_suite(seed=0), indent=1) + "\n")
    print(f"wrote {out}")
