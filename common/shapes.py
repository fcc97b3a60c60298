"""The embedded "shapes" world: scene specs, caption grammar, renderer, train/test splits and a
mini-GenEval scorer. Everything is procedural and deterministic; nothing is downloaded.

A prompt's *spec* is a plain dict:
    {"category": "color_attr", "caption": "a red circle and a blue square",
     "objects": [{"shape": "circle", "color": "red", "count": 1}, ...],
     "relation": None | "left_of" | "right_of" | "above" | "below"}   # relation is objects[0] -> objects[1]
Images are float tensors (N, 3, 32, 32) in [0, 1]; the background is black.
"""

import itertools
import random

import numpy as np
import torch
import torch.nn.functional as F

SIZE = 32
COLORS = {"red": (0.9, 0.1, 0.1), "green": (0.1, 0.8, 0.1), "blue": (0.15, 0.3, 1.0), "yellow": (0.95, 0.9, 0.1)}
SHAPES = ("circle", "square", "triangle")
PLURAL = {"circle": "circles", "square": "squares", "triangle": "triangles"}
NUMBERS = {1: "one", 2: "two", 3: "three"}
RELATIONS = {"left_of": "left of", "right_of": "right of", "above": "above", "below": "below"}
CATEGORIES = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
VOCAB = ["<pad>", "<bos>", "<unk>", "a", "and", "of", *NUMBERS.values(), *SHAPES, *PLURAL.values(), *COLORS,
         "left", "right", "above", "below"]


# ----------------------------------------------------------------------------------- grammar
def _noun(obj):
    words = ["a"] if obj["count"] == 1 and not obj["exact"] else [NUMBERS[obj["count"]]]
    color = [obj["color"]] if obj["color"] else []
    shape = obj["shape"] if obj["count"] == 1 else PLURAL[obj["shape"]]
    return " ".join(words + color + [shape])


def make_spec(category, objects, relation=None):
    """objects: list of (shape, color or None, count)."""
    objs = [{"shape": s, "color": c, "count": n, "exact": category == "counting"} for s, c, n in objects]
    if relation:
        caption = f"{_noun(objs[0])} {RELATIONS[relation]} {_noun(objs[1])}"
    else:
        caption = " and ".join(_noun(o) for o in objs)
    return {"category": category, "caption": caption, "objects": objs, "relation": relation}


def all_specs():
    """Every caption of the grammar, in a fixed order (144 prompts)."""
    specs = [make_spec("single_object", [(s, None, 1)]) for s in SHAPES]
    specs += [make_spec("two_object", [(a, None, 1), (b, None, 1)]) for a, b in itertools.combinations(SHAPES, 2)]
    specs += [make_spec("counting", [(s, None, n)]) for s in SHAPES for n in (1, 2, 3)]
    specs += [make_spec("counting", [(s, c, n)]) for s in SHAPES for c in COLORS for n in (2, 3)]
    specs += [make_spec("colors", [(s, c, 1)]) for s in SHAPES for c in COLORS]
    specs += [make_spec("position", [(a, None, 1), (b, None, 1)], r)
              for a, b in itertools.permutations(SHAPES, 2) for r in RELATIONS]
    specs += [make_spec("color_attr", [(a, ca, 1), (b, cb, 1)])
              for a, b in itertools.combinations(SHAPES, 2) for ca in COLORS for cb in COLORS if ca != cb]
    return specs


def parse_caption(caption):
    """Caption -> spec. Raises ValueError naming the caption if the grammar cannot parse it."""
    text = " ".join(caption.lower().strip().split())
    spec = _CAPTION_INDEX.get(text)
    if spec is None:
        raise ValueError(f"cannot parse prompt {caption!r} with the shapes grammar "
                         f"(examples: {', '.join(repr(s['caption']) for s in all_specs()[::29])})")
    return spec


_CAPTION_INDEX = {s["caption"]: s for s in all_specs()}


def _composition_key(spec):
    """What the test split holds out: a (shape, colour) binding, a (count, shape) pair or a relation triple."""
    o = spec["objects"]
    if spec["category"] in ("colors", "color_attr"):
        return [(x["shape"], x["color"]) for x in o]
    if spec["category"] == "counting":
        return [(o[0]["count"], o[0]["shape"], o[0]["color"])]
    if spec["category"] == "position":
        return [(o[0]["shape"], spec["relation"], o[1]["shape"])]
    return []


# held-out compositions: never rendered in pretraining, never used as RL training prompts
HELD_OUT = {("triangle", "green"), ("circle", "yellow"), ("square", "blue"),
            (3, "triangle", None), (2, "circle", "red"), (3, "square", "yellow"), (2, "triangle", "blue"),
            ("circle", "left_of", "square"), ("triangle", "above", "circle"), ("square", "below", "triangle"),
            ("triangle", "right_of", "square")}


def split_specs(split):
    """Deterministic train / test split. The test split holds every prompt whose composition is held out;
    single_object and two_object have only 3 captions each, so they appear in both splits."""
    if split not in ("train", "test", "all"):
        raise ValueError(f"unknown split {split!r}; choose from: train, test, all")
    specs = all_specs()
    if split == "all":
        return specs
    out = []
    for s in specs:
        held = any(k in HELD_OUT for k in _composition_key(s))
        if s["category"] in ("single_object", "two_object") or held == (split == "test"):
            out.append(s)
    return out


# ----------------------------------------------------------------------------------- renderer
def _mask(shape, cx, cy, r):
    yy, xx = np.mgrid[0:SIZE, 0:SIZE] + 0.5
    if shape == "circle":
        return (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r
    if shape == "square":
        h = r * 0.85
        return (np.abs(xx - cx) <= h) & (np.abs(yy - cy) <= h)
    # upward triangle: apex at top, base at the bottom
    top, bot = cy - r, cy + r * 0.8
    half = (yy - top) / (bot - top) * r * 1.1
    return (yy >= top) & (yy <= bot) & (np.abs(xx - cx) <= half)


def _relation_holds(rel, a, b, margin=3.0, ratio=1.0):
    """a is `rel` b if the centre offset along that axis exceeds `margin` pixels and dominates the other axis."""
    dx, dy = a[0] - b[0], a[1] - b[1]
    horiz, vert = abs(dx) > ratio * abs(dy), abs(dy) > ratio * abs(dx)
    return {"left_of": dx < -margin and horiz, "right_of": dx > margin and horiz,
            "above": dy < -margin and vert, "below": dy > margin and vert}[rel]


def render(spec, rng):
    """One ground-truth image (3, 32, 32) for a spec; unspecified colours are random."""
    for _ in range(1000):
        items = []  # (shape, color, cx, cy, r, group)
        for g, o in enumerate(spec["objects"]):
            color = o["color"]
            for _ in range(o["count"]):
                items.append([o["shape"], color or rng.choice(list(COLORS)), 0, 0, rng.uniform(4.0, 5.5), g])
        ok = True
        for it in items:
            it[2], it[3] = rng.uniform(it[4] + 1, SIZE - it[4] - 1), rng.uniform(it[4] + 1, SIZE - it[4] - 1)
        for a, b in itertools.combinations(items, 2):
            if np.hypot(a[2] - b[2], a[3] - b[3]) < a[4] + b[4] + 3:
                ok = False
        if spec["relation"] and ok:
            ok = _relation_holds(spec["relation"], items[0][2:4], items[1][2:4], margin=5.0, ratio=1.5)
        if ok:
            break
    img = np.zeros((3, SIZE, SIZE), dtype=np.float32)
    for shape, color, cx, cy, r, _ in items:
        img[:, _mask(shape, cx, cy, r)] = np.array(COLORS[color], dtype=np.float32)[:, None]
    return torch.from_numpy(img)


def render_batch(specs, seed):
    rng = random.Random(seed)
    return torch.stack([render(s, rng) for s in specs])


# ----------------------------------------------------------------------------------- scorer
_PROTO = torch.tensor(list(COLORS.values()))  # (4, 3)


def detect(images, min_area=6):
    """Find objects. Returns per image a list of dicts {shape, color, cx, cy, area}.

    Colour: a pixel is foreground if its brightest channel > 0.3; it takes the nearest colour
    prototype (Euclidean RGB) if within 0.45, otherwise it is ignored.
    Objects: 8-connected components of each colour mask (label propagation with max-pooling),
    components smaller than `min_area` pixels are noise.
    Shape, from the fill ratio (area / bounding-box area) and the 4 bounding-box corner pixels:
    a square fills >= 3 corners (and > 80% of its box); a triangle (apex up) fills < 60% of its box
    or only bottom corners; anything else is a circle (no corners, fill near pi/4).
    """
    x = images.detach().float().clamp(0, 1).cpu()
    if x.shape[-1] != SIZE or x.shape[-2] != SIZE:  # e.g. SD3 images: score a 32x32 area-downsampled copy
        x = F.interpolate(x, size=(SIZE, SIZE), mode="area")
    n = x.shape[0]
    pix = x.permute(0, 2, 3, 1)  # (N, H, W, 3)
    dist = torch.cdist(pix.reshape(n, -1, 3), _PROTO[None].expand(n, -1, -1))  # (N, HW, 4)
    d, idx = dist.min(-1)
    fg = (pix.max(-1).values.reshape(n, -1) > 0.3) & (d < 0.45)
    masks = torch.stack([(fg & (idx == c)).reshape(n, SIZE, SIZE) for c in range(len(COLORS))], 1).float()
    lab = masks * torch.arange(1, SIZE * SIZE + 1, dtype=torch.float32).reshape(1, 1, SIZE, SIZE)
    for _ in range(4 * SIZE):
        new = F.max_pool2d(lab, 3, 1, 1) * masks
        if torch.equal(new, lab):
            break
        lab = new
    names = list(COLORS)
    out = []
    yy, xx = torch.meshgrid(torch.arange(SIZE) + 0.5, torch.arange(SIZE) + 0.5, indexing="ij")
    for i in range(n):
        objs = []
        for c in range(len(COLORS)):
            l = lab[i, c]
            for v in torch.unique(l[l > 0]).tolist():
                m = l == v
                area = int(m.sum())
                if area < min_area:
                    continue
                ys, xs = yy[m], xx[m]
                x0, x1, y0, y1 = int(xs.min()), int(xs.max()), int(ys.min()), int(ys.max())
                fill = area / float((x1 - x0 + 1) * (y1 - y0 + 1))
                top, bottom = int(m[y0, x0]) + int(m[y0, x1]), int(m[y1, x0]) + int(m[y1, x1])
                shape = ("square" if top + bottom >= 3 and fill > 0.8 else
                         "triangle" if fill < 0.6 or (top == 0 and bottom > 0) else "circle")
                objs.append({"shape": shape, "color": names[c], "cx": float(xs.mean()), "cy": float(ys.mean()),
                             "area": area})
        out.append(objs)
    return out


def check(spec, objs):
    """Per-check results (dict name -> bool) for one image's detected objects, GenEval style:
    each object's shape is present; its colour is right (if given); its count is exact (counting);
    the relation holds between some instance of object 0 and some instance of object 1 (position).
    Like GenEval, extra objects are not penalised (outside counting); `clean_fraction` reports them."""
    res = {}
    for k, o in enumerate(spec["objects"]):
        same_shape = [d for d in objs if d["shape"] == o["shape"]]
        match = [d for d in same_shape if o["color"] is None or d["color"] == o["color"]]
        res[f"present_{k}"] = len(same_shape) > 0
        if o["color"] is not None:
            res[f"color_{k}"] = len(match) > 0
        if o.get("exact"):
            res[f"count_{k}"] = len(match) == o["count"]
    if spec["relation"]:
        a = [d for d in objs if d["shape"] == spec["objects"][0]["shape"]]
        b = [d for d in objs if d["shape"] == spec["objects"][1]["shape"]]
        res["position"] = any(_relation_holds(spec["relation"], (p["cx"], p["cy"]), (q["cx"], q["cy"]))
                              for p in a for q in b)
    return res


def clean_fraction(images, specs):
    """Fraction of images holding no more objects than their prompt asks for (a clutter diagnostic)."""
    return sum(len(o) <= sum(x["count"] for x in s["objects"]) for s, o in zip(specs, detect(images))) / len(specs)


def score(images, specs):
    """Mini-GenEval. Returns (partial credit (N,) in [0, 1], strict pass (N,) bool, per-image check dicts)."""
    results = [check(s, o) for s, o in zip(specs, detect(images))]
    partial = torch.tensor([sum(r.values()) / len(r) for r in results])
    strict = torch.tensor([all(r.values()) for r in results])
    return partial, strict, results
