"""Write shapes.json: the evaluation suite of the embedded 64×64 shapes model.

Each object is (color, shape, cx, cy, w) in relative coordinates; the region drawn for it
has the object's own shape (ellipse for a circle, rect for a square, an upright triangle
polygon), so a perfect image can reach IoU ≈ 1. Training scenes put objects of width
14–30 px (0.22–0.47) anywhere at random; layouts tagged "contradicts" put objects where
the model has no reason to put them by itself: crowded into one half or into the corners,
or in the opposite order to the caption. Run: python mag_explore/data/suites/make_shapes_suite.py
"""
import json
from pathlib import Path

LAYOUTS = [
    # name, tags, objects
    ("red circle, centre, large", [], [("red", "circle", .5, .5, .45)]),
    ("blue square, top-left corner", ["contradicts"], [("blue", "square", .2, .2, .25)]),
    ("green triangle, bottom-right", [], [("green", "triangle", .72, .72, .36)]),
    ("yellow circle, top-right corner, small", ["contradicts"], [("yellow", "circle", .82, .18, .22)]),
    ("purple square, bottom-left", [], [("purple", "square", .27, .72, .38)]),
    ("red triangle, top", [], [("red", "triangle", .5, .27, .4)]),
    ("left-right", [], [("red", "circle", .27, .5, .36), ("blue", "square", .73, .5, .36)]),
    ("right-left (caption order reversed)", ["contradicts"],
     [("red", "circle", .73, .5, .36), ("blue", "square", .27, .5, .36)]),
    ("top-bottom", [], [("green", "triangle", .5, .27, .34), ("yellow", "circle", .5, .73, .34)]),
    ("opposite corners, small", ["contradicts"],
     [("purple", "circle", .18, .18, .24), ("red", "square", .82, .82, .24)]),
    ("both in the top half", ["contradicts"],
     [("yellow", "square", .25, .22, .3), ("blue", "triangle", .75, .22, .3)]),
    ("both in the left half", ["contradicts"],
     [("red", "square", .25, .25, .3), ("green", "circle", .25, .75, .3)]),
    ("large and small", [], [("blue", "circle", .38, .45, .55), ("yellow", "triangle", .84, .84, .22)]),
    ("diagonal", [], [("purple", "triangle", .3, .3, .34), ("green", "square", .7, .7, .34)]),
    ("anti-diagonal", [], [("yellow", "circle", .72, .28, .34), ("red", "triangle", .28, .72, .34)]),
    ("both in the bottom half", ["contradicts"],
     [("green", "square", .25, .78, .3), ("purple", "circle", .75, .78, .3)]),
    ("both in the right half", ["contradicts"],
     [("blue", "triangle", .75, .25, .3), ("yellow", "square", .75, .75, .3)]),
    ("close together in the middle", [], [("red", "circle", .35, .5, .26), ("green", "triangle", .66, .5, .26)]),
    ("top-right and bottom-left corners", ["contradicts"],
     [("blue", "square", .78, .22, .3), ("purple", "triangle", .22, .78, .3)]),
    ("three: two up, one down", [],
     [("red", "circle", .2, .25, .28), ("blue", "square", .8, .25, .28), ("green", "triangle", .5, .75, .3)]),
    ("three in a row", [],
     [("yellow", "square", .2, .5, .26), ("purple", "circle", .5, .5, .26), ("red", "triangle", .8, .5, .26)]),
    ("three in a column", ["contradicts"],
     [("green", "circle", .5, .18, .26), ("blue", "triangle", .5, .5, .26), ("yellow", "square", .5, .82, .26)]),
    ("three: L shape", [],
     [("purple", "square", .25, .25, .3), ("yellow", "triangle", .75, .3, .3), ("blue", "circle", .3, .75, .3)]),
    ("three: scattered", [],
     [("red", "square", .75, .2, .24), ("green", "circle", .2, .55, .24), ("purple", "triangle", .72, .78, .26)]),
    ("three circles", [],
     [("blue", "circle", .18, .18, .22), ("red", "circle", .82, .18, .22), ("yellow", "circle", .5, .8, .3)]),
    ("three along the bottom edge", ["contradicts"],
     [("green", "square", .2, .82, .22), ("purple", "square", .5, .82, .22), ("blue", "triangle", .8, .82, .22)]),
]


def region(color, shape, cx, cy, w):
    phrase, h = f"{color} {shape}", w / 2
    if shape == "circle":
        return {"phrase": phrase, "ellipse": _round([cx, cy, h, h])}
    if shape == "square":
        return {"phrase": phrase, "rect": _round([cx - h, cy - h, cx + h, cy + h])}
    return {"phrase": phrase, "polygon": [_round(p) for p in ([cx, cy - h], [cx + h, cy + h], [cx - h, cy + h])]}


def _round(values):
    return [round(v, 4) for v in values]


def caption(objects):
    parts = [f"a {c} {s}" for c, s, *_ in objects]
    return " and ".join(parts) if len(parts) <= 2 else ", ".join(parts[:-1]) + " and " + parts[-1]


def check(name, objects):
    for c, s, cx, cy, w in objects:
        assert w / 2 <= cx <= 1 - w / 2 and w / 2 <= cy <= 1 - w / 2, (name, c)
    for i, a in enumerate(objects):
        for b in objects[i + 1:]:  # boxes keep apart, as in the training scenes
            assert max(abs(a[2] - b[2]), abs(a[3] - b[3])) > (a[4] + b[4]) / 2, (name, a[0], b[0])
    assert len({c for c, *_ in objects}) == len(objects), name  # distinct colors, as in training


def main():
    layouts = []
    for name, tags, objects in LAYOUTS:
        check(name, objects)
        layouts.append({"name": name, "prompt": caption(objects), "tags": tags,
                        "regions": [region(*o) for o in objects]})
    suite = {"description": "Layouts for the embedded shapes model (64×64): relative coordinates, "
                            "one region per object; made by make_shapes_suite.py", "layouts": layouts}
    out = Path(__file__).with_name("shapes.json")
    out.write_text(json.dumps(suite, indent=1) + "\n")
    print(f"wrote {out}: {len(layouts)} layouts")


if __name__ == "__main__":
    main()
