"""The embedded "shapes" world: scene specs, caption grammar, renderer, train/test splits and a
mini-GenEval scorer. Everything is procedural and deterministic; nothing is downloaded.

A prompt's *spec* is a plain dict:
    {"category": "color_attr", "caption": "a red circle and a blue square",
     "objects": [{"shape": "circle", "color": "red", "count": 1}, ...],
     "relation": None | "left_of" | "right_of" | "above" | "below"}   # relation is objects[0] -> objects[1]
Images are float tensors (N, 3, 32, 32) in [0, 1]; the background is black.
"""

import itertools
import math
import random

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

SIZE = 32
COLORS = {"red": (0.9, 0.1, 0.1), "green": (0.1, 0.8, 0.1), "blue": (0.15, 0.3, 1.0), "yellow": (0.95, 0.9, 0.1)}
SHAPES = ("circle", "square", "triangle")
PLURAL = {"circle": "circles", "square": "squares", "triangle": "triangles"}
NUMBERS = {1: "one", 2: "two", 3: "three"}
R_MIN, R_MAX, GAP = 4.5, 6.0, 2.5  # object "radius" range and the minimum gap between two objects, in pixels
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
                         f"(examples: {', '.join(repr(c) for c in list(_CAPTION_INDEX)[::29])})")
    return spec


def is_spec(meta):
    """True for a shapes spec (what the scorer reads); False for None and for other prompt metadata (a GenEval /
    DrawBench JSON line of a --prompts-file)."""
    return isinstance(meta, dict) and "objects" in meta and "caption" in meta


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
def _mask(shape, cx, cy, r, xx=None, yy=None):
    """Ideal mask of a shape centred at (cx, cy) with "radius" r, on pixel centres (xx, yy) (default: the canvas).
    Written with operators only, so it broadcasts over numpy arrays (renderer) and torch tensors (scorer)."""
    if xx is None:
        yy, xx = np.mgrid[0:SIZE, 0:SIZE] + 0.5
    if shape == "circle":
        return (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r
    if shape == "square":  # side 1.7 r
        h = r * 0.85
        return (abs(xx - cx) <= h) & (abs(yy - cy) <= h)
    # upward triangle: apex at cy - r, base (width 2.2 r) at cy + 0.8 r
    top, bot = cy - r, cy + r * 0.8
    half = (yy - top) / (bot - top) * r * 1.1
    return (yy >= top) & (yy <= bot) & (abs(xx - cx) <= half)


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
                items.append([o["shape"], color or rng.choice(list(COLORS)), 0, 0, rng.uniform(R_MIN, R_MAX), g])
        ok = True
        for it in items:
            it[2], it[3] = rng.uniform(it[4] + 1, SIZE - it[4] - 1), rng.uniform(it[4] + 1, SIZE - it[4] - 1)
        for a, b in itertools.combinations(items, 2):  # shapes grown by GAP / 2 px must not touch
            if np.hypot(a[2] - b[2], a[3] - b[3]) < a[4] + b[4] + GAP or (
                    _mask(a[0], a[2], a[3], a[4] + GAP / 2 + 0.5) & _mask(b[0], b[2], b[3], b[4] + GAP / 2 + 0.5)).any():
                ok = False
        if spec["relation"] and ok:
            ok = _relation_holds(spec["relation"], items[0][2:4], items[1][2:4], margin=5.0, ratio=1.5)
        if ok:
            break
    else:
        raise RuntimeError(f"could not place the objects of {spec['caption']!r} without overlap")
    img = np.zeros((3, SIZE, SIZE), dtype=np.float32)
    for shape, color, cx, cy, r, _ in items:
        img[:, _mask(shape, cx, cy, r)] = np.array(COLORS[color], dtype=np.float32)[:, None]
    return torch.from_numpy(img)


def render_batch(specs, seed):
    rng = random.Random(seed)
    return torch.stack([render(s, rng) for s in specs])


# ----------------------------------------------------------------------------------- scorer
# Scorer v2: GenEval in spirit (objects, colours, counts, positions), strict where GenEval leans on a real detector.
# Rules, in order (every number is a module constant below):
#  1. Foreground: a pixel whose brightest channel exceeds FG_THRESHOLD (0.4, about half an object's brightness,
#     so a half-covered edge pixel of a clean render counts once) is foreground; the rest is background.
#  2. Colour: a foreground pixel is divided by its brightest channel (chromaticity, so dim edge pixels keep their
#     hue) and takes the nearest colour prototype (equally normalised) if it lies within COLOR_TOLERANCE (0.35);
#     otherwise it is off-colour (no object can use it; it counts as stray).
#  3. Components: 8-connected components of each colour's pixels. A component smaller than MIN_AREA (12 px; the
#     smallest object of the world is ~40 px) is a speck: its pixels are stray, it is not an object.
#  4. Shape: every other component is compared with the ideal mask of each shape (the renderer's own geometry),
#     placed by the component's moments (area, centroid) and refined over a small grid of centre offsets and radii; the
#     shape is the best fit if its intersection-over-union >= SHAPE_IOU (0.8), beats the second-best shape
#     by SHAPE_MARGIN (0.03), and its fitted radius is an object's size (SIZE_RANGE x the world's R_MIN..R_MAX,
#     so a canvas painted in one colour is not a "square"). Otherwise the component is an "unknown" object: it is counted, but it can satisfy
#     no requirement (a ragged blob, two merged objects, half a shape).
#  5. Stray pixels: foreground pixels that belong to no recognised shape (specks, unknown objects, off-colour
#     pixels).
#  6. Matching: the prompt asks for instances (shape, colour or any, count each). Each requested object takes up
#     to `count` detected objects of its shape, right-coloured ones first (best fits first): credit = quality x
#     (1 for the right colour or when no colour is asked, 0.5 for a wrong colour), where quality ramps linearly
#     from 0 at IoU SHAPE_IOU to 1 at IoU FULL_IOU (0.94; every ground-truth render fits better), so a sloppy
#     shape earns less than a clean one. Requested objects have distinct shapes in the grammar, so this greedy
#     matching is exact.
#  7. Partial credit (the `shapes` reward) = F1 over objects x relation factor x clean factor:
#       F1 = 2 * credit / (requested instances + detected objects)     (every unexplained object costs precision,
#            every missing one costs recall; n detected objects, unknowns included)
#       relation factor = 1 if the relation holds between some matched instance of object 0 and some matched
#            instance of object 1 (centre offset > 3 px along the axis, dominating the other axis), else 0.5;
#            1 for prompts without a relation
#       clean factor = 1 - stray pixels / foreground pixels.
#  8. Strict (`shapes_strict`, the exact scene): every requested instance matched in the right colour, no other object
#     (known or unknown), the relation holds, and at most MAX_STRAY (10) stray pixels.
# Ground-truth renders are 100% strict; noise, blobs, fragments, one-colour canvases score near 0 (tests).
# Reported beside the reward, not part of it: `texture` (speckle, below) and `clean_fraction` (no extra object).
FG_THRESHOLD, COLOR_TOLERANCE, MIN_AREA, SHAPE_IOU, SHAPE_MARGIN, MAX_STRAY = 0.4, 0.35, 12, 0.8, 0.03, 10
SIZE_RANGE, FULL_IOU = (0.7, 1.4), 0.94
_PROTO = torch.tensor(list(COLORS.values()))
_PROTO = _PROTO / _PROTO.max(1, keepdim=True).values  # (4, 3), chromaticity of each colour
_YY, _XX = torch.meshgrid(torch.arange(SIZE) + 0.5, torch.arange(SIZE) + 0.5, indexing="ij")
_X1, _Y1 = _XX[:1].view(1, 1, SIZE), _YY[:, :1].view(1, SIZE, 1)  # pixel centres as a row and a column
_OFFSETS = torch.tensor([(dx, dy, dr) for dx in (-0.5, -0.25, 0, 0.25, 0.5) for dy in (-0.5, -0.25, 0, 0.25, 0.5)
                         for dr in (0.94, 0.97, 1.0, 1.03, 1.06)])


def _fit_shapes(m):
    """Best IoU of a component mask m (32, 32) with each shape's ideal mask: (cx, cy, r) first from the
    component's moments (area = k r^2; centroid, which for the apex-up triangle lies 0.2 r below its (cx, cy)),
    then refined over _OFFSETS. Returns {shape: (iou, radius)}."""
    area, mx, my = float(m.sum()), float(_XX[m].mean()), float(_YY[m].mean())
    out = {}
    for shape, k, dy in (("circle", math.pi, 0.0), ("square", 1.7**2, 0.0), ("triangle", 0.5 * 2.2 * 1.8, 0.2)):
        r = math.sqrt(area / k)
        cxs, cys, rs = mx + _OFFSETS[:, 0], my - dy * r + _OFFSETS[:, 1], r * _OFFSETS[:, 2]
        # every ideal mask lies within 1.1 r of its centre on both axes: computed on that window only (clipped to
        # the canvas), on a row and a column of pixel centres (what depends on x or y alone, once per column or
        # row): the same numbers as on the full 32 x 32 grid, with the components below the scorer 1.5-2x faster
        reach = 1.1 * float(rs.max()) + 1
        x0, x1 = max(0, math.floor(float(cxs.min()) - reach)), min(SIZE, math.ceil(float(cxs.max()) + reach))
        y0, y1 = max(0, math.floor(float(cys.min()) - reach)), min(SIZE, math.ceil(float(cys.max()) + reach))
        ideal = _mask(shape, cxs.view(-1, 1, 1), cys.view(-1, 1, 1), rs.view(-1, 1, 1), _X1[..., x0:x1],
                      _Y1[:, y0:y1])  # (K, y1 - y0, x1 - x0)
        inter = (ideal & m[y0:y1, x0:x1]).flatten(1).sum(1)
        union = ideal.flatten(1).sum(1) + int(area) - inter
        iou, k = (inter / union).max(0)
        out[shape] = (float(iou), float(rs[k]))
    return out


def detect(images):
    """Rules 1-5. Returns per image a dict {"objects": [{shape (or "unknown"), color, cx, cy, area, iou}],
    "stray": stray pixels, "foreground": foreground pixels}."""
    x = images.detach().float().clamp(0, 1).cpu()
    if x.shape[-1] != SIZE or x.shape[-2] != SIZE:  # e.g. SD3 images: score a 32x32 area-downsampled copy
        x = F.interpolate(x, size=(SIZE, SIZE), mode="area")
    n = x.shape[0]
    pix = x.permute(0, 2, 3, 1).reshape(n, -1, 3)  # (N, HW, 3)
    bright = pix.max(-1).values
    fg = bright > FG_THRESHOLD
    d, idx = torch.cdist(pix / bright.clamp_min(1e-6)[..., None], _PROTO[None].expand(n, -1, -1)).min(-1)
    colored = fg & (d < COLOR_TOLERANCE)
    masks = torch.stack([(colored & (idx == c)).reshape(n, SIZE, SIZE) for c in range(len(COLORS))], 1).numpy()
    names = list(COLORS)
    out = []
    for i in range(n):
        objs, explained = [], 0
        for c in range(len(COLORS)):
            lab, n_comp = ndimage.label(masks[i, c], structure=np.ones((3, 3)))  # 8-connected components
            if not n_comp:
                continue
            # in the order of each component's last pixel (row-major)
            last = ndimage.maximum(np.arange(SIZE * SIZE).reshape(SIZE, SIZE), lab, range(1, n_comp + 1))
            for v in np.argsort(last) + 1:
                m = torch.from_numpy(lab == v)
                area = int(m.sum())
                if area < MIN_AREA:
                    continue
                xs, ys = _XX[m], _YY[m]
                fits = sorted(_fit_shapes(m).items(), key=lambda kv: -kv[1][0])
                (best, (iou, r)), second = fits[0], fits[1][1][0]
                sized = SIZE_RANGE[0] * R_MIN <= r <= SIZE_RANGE[1] * R_MAX
                shape = best if iou >= SHAPE_IOU and iou - second >= SHAPE_MARGIN and sized else "unknown"
                explained += area if shape != "unknown" else 0
                objs.append({"shape": shape, "color": names[c], "cx": float(xs.mean()), "cy": float(ys.mean()),
                             "area": area, "iou": round(iou, 3)})
        nfg = int(fg[i].sum())
        out.append({"objects": objs, "stray": nfg - explained, "foreground": nfg})
    return out


def check(spec, det):
    """Rules 6-8 for one image. Returns a dict: partial (float), strict (bool), and the parts (credit, requested,
    detected, relation, stray, extra objects)."""
    objs = det["objects"]
    credit, requested, matched, colours_right = 0.0, 0, [], True
    for o in spec["objects"]:
        same = sorted([d for d in objs if d["shape"] == o["shape"]], key=lambda d: -d["iou"])
        right = [d for d in same if o["color"] is None or d["color"] == o["color"]]
        wrong = [d for d in same if d not in right]
        take = (right + wrong)[: o["count"]]
        quality = [min(1.0, (d["iou"] - SHAPE_IOU) / (FULL_IOU - SHAPE_IOU)) for d in take]
        credit += sum(q * (1.0 if d in right else 0.5) for q, d in zip(quality, take))
        colours_right &= len(right) >= o["count"]
        requested += o["count"]
        matched.append(take)
    relation = True
    if spec["relation"]:
        relation = any(_relation_holds(spec["relation"], (p["cx"], p["cy"]), (q["cx"], q["cy"]))
                       for p in matched[0] for q in matched[1])
    f1 = 2 * credit / (requested + len(objs))
    clean = 1 - det["stray"] / det["foreground"] if det["foreground"] else 0.0
    partial = f1 * (1.0 if relation else 0.5) * clean
    strict = colours_right and len(objs) == requested and relation and det["stray"] <= MAX_STRAY
    return {"partial": partial, "strict": strict, "credit": credit, "requested": requested, "detected": len(objs),
            "extra": len(objs) > requested, "relation": relation, "stray": det["stray"]}


def clean_fraction(images, specs):
    """Fraction of images holding no more objects (recognised or unknown) than their prompt asks for."""
    return sum(not check(s, d)["extra"] for s, d in zip(specs, detect(images))) / len(specs)


TEXTURE_TOLERANCE = 0.02  # ~5 of 255 grey levels


def texture(images):
    """Speckle: per image, the fraction of its pixels (0 to 1) that lie more than TEXTURE_TOLERANCE outside the
    range [min, max] of their 4 neighbours (up, down, left, right; those on the canvas) in some channel, on
    [0, 1] pixel values (larger images: on the scorer's 32x32 area-downsampled copy). A render is flat fills with
    hard edges in which every pixel has a 4-neighbour of its own colour, so it scores exactly 0, and a blurred
    edge is a monotone ramp between its neighbours, so it scores 0 too; an isolated off-colour pixel, a
    1-pixel checkerboard, noise inside a shape or on the background counts, dim pixels too (below FG_THRESHOLD,
    where the reward does not look). Not counted: a flat blotch 2 px wide or more, a uniform 1-px stripe. Not part
    of any reward. Returns (N,)."""
    x = images.detach().float().clamp(0, 1).cpu()
    if x.shape[-1] != SIZE or x.shape[-2] != SIZE:
        x = F.interpolate(x, size=(SIZE, SIZE), mode="area")

    def neighbours(fill):  # (4, N, 3, 32, 32); `fill` off the canvas, so that it never sets the min / max
        p = F.pad(x, (1, 1, 1, 1), value=fill)
        return torch.stack([p[..., 1 + dy:SIZE + 1 + dy, 1 + dx:SIZE + 1 + dx]
                            for dy, dx in ((-1, 0), (1, 0), (0, -1), (0, 1))])

    outside = (x - neighbours(-math.inf).amax(0)).clamp_min(0) + (neighbours(math.inf).amin(0) - x).clamp_min(0)
    return (outside.amax(1) > TEXTURE_TOLERANCE).flatten(1).float().mean(1)


def score(images, specs):
    """Returns (partial credit (N,) in [0, 1], strict exact-scene pass (N,) bool, per-image check dicts)."""
    results = [check(s, d) for s, d in zip(specs, detect(images))]
    return (torch.tensor([r["partial"] for r in results]), torch.tensor([r["strict"] for r in results]), results)


# ----------------------------------------------------------------------------------- as rewards (`--reward shapes`)
def _specs(prompts, metadata):
    metadata = metadata or [None] * len(prompts)
    return [m if is_spec(m) else parse_caption(p) for p, m in zip(prompts, metadata)]


def reward_partial(images, prompts, metadata=None):
    """The reward `shapes`: mini-GenEval partial credit in [0, 1] (`score`); metadata: specs, else parsed from the
    prompts."""
    return score(images, _specs(prompts, metadata))[0]


def reward_strict(images, prompts, metadata=None):
    """The reward `shapes_strict`: mini-GenEval strict pass/fail as 0/1."""
    return score(images, _specs(prompts, metadata))[1].float()
