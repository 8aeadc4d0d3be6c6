"""The synthetic transit-map world: a seeded city generator and a Pillow renderer (docs/rewardmap.md §2.4).

No real maps can be downloaded on our machines, so the embedded default is a synthetic metro network
drawn like a schematic metro map. A city is built on an integer grid: every grid node a line visits is
one of its stations, and lines move only in the 8 octilinear directions, so the drawing has the usual
0/45/90-degree look. Two lines that visit the same node share that station: it is an interchange.
Lines never share an edge (no overlapping segments) and diagonal edges never cross each other between
nodes, so every crossing on the drawing is a station where both lines stop.

    city = generate_city(seed=0, difficulty="hard")   # metro, colours, grid positions
    render_map(city, "map.png")                      # a 2,000-3,000 px wide PNG

`data.py` re-exports `generate_city`, `generate_metro` and `render_map`.
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

Node = tuple[int, int]  # grid position (column, row); rows grow downwards like image coordinates

# Vivid, mutually distinct colours. Colour-named lines ("Red Line") are drawn in their own colour.
PALETTE: dict[str, tuple[int, int, int]] = {
    "Red": (228, 30, 38),
    "Blue": (0, 92, 200),
    "Green": (0, 155, 70),
    "Orange": (250, 130, 0),
    "Purple": (128, 40, 170),
    "Yellow": (235, 190, 0),
    "Pink": (240, 90, 170),
    "Brown": (140, 80, 30),
    "Teal": (0, 160, 160),
    "Navy": (20, 35, 110),
    "Lime": (140, 200, 20),
    "Magenta": (200, 0, 120),
    "Sky": (60, 175, 240),
    "Grey": (120, 120, 120),
}

# Network size per map difficulty (issue 2: roughly 2-4 / 4-7 / 7-12 lines). `grid` is columns x rows
# of the station grid, `spacing` the pixels between neighbouring nodes: the image is about
# grid * spacing plus title and legend, i.e. ~0.9k / ~1.6k / ~2.6k px wide.
LEVELS = {
    "easy": dict(lines=(2, 4), stations=(5, 9), grid=(10, 8), spacing=84, loop_p=0.0, width=16, font=17),
    "middle": dict(lines=(4, 7), stations=(7, 13), grid=(17, 12), spacing=88, loop_p=0.35, width=12, font=17),
    "hard": dict(lines=(7, 12), stations=(10, 19), grid=(27, 19), spacing=92, loop_p=0.6, width=10, font=17),
}
MAX_LINES_PER_STATION = 3

DIRS: list[Node] = [(1, 0), (1, 1), (0, 1), (-1, 1), (-1, 0), (-1, -1), (0, -1), (1, -1)]


@dataclass
class City:
    """A generated city: metro data plus what the renderer needs to draw it."""

    name: str  # display name, e.g. "Varentia"
    slug: str  # file-name form, e.g. "varentia"
    difficulty: str  # easy | middle | hard (map difficulty)
    metro: dict[str, list[str]]  # line -> ordered station names (a loop repeats its first station last)
    colours: dict[str, tuple[int, int, int]]  # line -> RGB
    positions: dict[str, Node]  # station -> grid node
    grid: tuple[int, int]  # columns, rows
    loops: list[str] = field(default_factory=list)  # lines that are loops


# ---------------------------------------------------------------------------------------------------
# names

_ONSETS = ["b", "c", "d", "f", "g", "h", "k", "l", "m", "n", "p", "r", "s", "t", "v", "w", "z",
           "br", "cr", "dr", "fr", "gr", "kl", "pr", "st", "tr", "sh", "ch", "th", "bl", "sl"]
_VOWELS = ["a", "e", "i", "o", "u", "a", "e", "o", "ai", "ea", "ou", "io"]
_CODAS = ["", "", "", "n", "r", "l", "s", "m", "nd", "rt", "th", "ck"]
_PREFIXES = ["North", "South", "East", "West", "Old", "New", "Upper", "Lower", "Port", "Fort"]
_SUFFIXES = ["Park", "Square", "Road", "Gate", "Hill", "Bridge", "Market", "Cross", "Street", "Garden",
             "Harbour", "Central", "Heights", "Junction", "Lake", "Fields", "Quay", "Mill"]


def make_word(rng: random.Random, syllables: tuple[int, int] = (2, 3)) -> str:
    """A pronounceable made-up word: consonant-vowel syllables, an optional closing consonant."""
    n = rng.randint(*syllables)
    word = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(n)) + rng.choice(_CODAS)
    return word.capitalize()


def _name_key(name: str) -> str:
    """The key ReasonMap's answer normalisation compares on: two names with one key would be ambiguous."""
    return re.sub(r"[\s\-]|station", "", name.lower())


def make_station_names(rng: random.Random, n: int) -> list[str]:
    """n unique, pronounceable station names ending in " Station" (as the real English metro files do)."""
    names, keys = [], set()
    while len(names) < n:
        r = rng.random()
        word = make_word(rng)
        if r < 0.55:
            base = word
        elif r < 0.8:
            base = f"{word} {rng.choice(_SUFFIXES)}"
        else:
            base = f"{rng.choice(_PREFIXES)} {make_word(rng, (2, 2))}"
        if len(base) > 17 or _name_key(base) in keys:
            continue
        keys.add(_name_key(base))
        names.append(base + " Station")
    return names


def _line_names(rng: random.Random, n: int) -> tuple[list[str], list[tuple[int, int, int]]]:
    """Line names and colours: numbered ("Line 3") in most cities, colour-named ("Red Line") in others."""
    colours = rng.sample(list(PALETTE), n)
    if rng.random() < 0.35:
        return [f"{c} Line" for c in colours], [PALETTE[c] for c in colours]
    numbers = list(range(1, n + 1))
    if rng.random() < 0.3:  # real networks have gaps in their numbering
        numbers = sorted(rng.sample(range(1, n + 4), n))
    return [f"Line {k}" for k in numbers], [PALETTE[c] for c in colours]


# ---------------------------------------------------------------------------------------------------
# network


class _Grid:
    """Occupancy bookkeeping while lines are laid out."""

    def __init__(self, cols: int, rows: int):
        self.cols, self.rows = cols, rows
        self.node_lines: dict[Node, set[int]] = {}
        self.edges: set[frozenset] = set()
        self.diag_cells: set[Node] = set()  # top-left corner of each cell crossed by a diagonal edge

    def can_step(self, line: int, own: set[Node], a: Node, b: Node) -> bool:
        if not (0 <= b[0] < self.cols and 0 <= b[1] < self.rows) or b in own:
            return False
        if frozenset((a, b)) in self.edges:
            return False
        if a[0] != b[0] and a[1] != b[1] and (min(a[0], b[0]), min(a[1], b[1])) in self.diag_cells:
            return False  # would cross another diagonal between two nodes
        return len(self.node_lines.get(b, ())) < MAX_LINES_PER_STATION

    def add(self, line: int, nodes: list[Node]) -> None:
        for node in nodes:
            self.node_lines.setdefault(node, set()).add(line)
        for a, b in zip(nodes, nodes[1:]):
            self.edges.add(frozenset((a, b)))
            if a[0] != b[0] and a[1] != b[1]:
                self.diag_cells.add((min(a[0], b[0]), min(a[1], b[1])))


def _walk(rng: random.Random, grid: _Grid, line: int, own: set[Node], start: Node, d: int, n: int,
          turn_p: float) -> list[Node]:
    """Up to n octilinear steps from start, turning by 45 degrees now and then; nodes after start."""
    out, cur = [], start
    for _ in range(n):
        first = [rng.choice((1, -1))] if rng.random() < turn_p else [0]
        options = first + [o for o in (0, 1, -1, 2, -2) if o not in first]
        for o in options:
            nd = (d + o) % 8
            nxt = (cur[0] + DIRS[nd][0], cur[1] + DIRS[nd][1])
            if grid.can_step(line, own, cur, nxt):
                grid.add(line, [cur, nxt])
                own.add(nxt)
                out.append(nxt)
                cur, d = nxt, nd
                break
        else:
            break
    return out


def _loop_nodes(cols: int, rows: int, rng: random.Random) -> list[Node]:
    """An octagonal circle line around the centre (corners cut at 45 degrees), nodes in order."""
    cx, cy = cols // 2 + rng.randint(-1, 1), rows // 2 + rng.randint(-1, 1)
    rx, ry = max(2, cols // 4), max(2, rows // 4)
    c = max(1, min(rx, ry) // 2)
    corners = [(cx - rx + c, cy - ry), (cx + rx - c, cy - ry), (cx + rx, cy - ry + c), (cx + rx, cy + ry - c),
               (cx + rx - c, cy + ry), (cx - rx + c, cy + ry), (cx - rx, cy + ry - c), (cx - rx, cy - ry + c)]
    nodes = []
    for (x0, y0), (x1, y1) in zip(corners, corners[1:] + corners[:1]):
        steps = max(abs(x1 - x0), abs(y1 - y0))
        sx, sy = (x1 > x0) - (x1 < x0), (y1 > y0) - (y1 < y0)
        nodes += [(x0 + k * sx, y0 + k * sy) for k in range(steps)]
    return nodes


def _layout(rng: random.Random, level: dict) -> tuple[list[list[Node]], list[int]]:
    """Node sequences of all lines (index order) and the indices of loop lines."""
    cols, rows = level["grid"]
    n_lines = rng.randint(*level["lines"])
    lo, hi = level["stations"]
    for _attempt in range(50):
        grid, lines, loops = _Grid(cols, rows), [], []
        if rng.random() < level["loop_p"]:
            nodes = _loop_nodes(cols, rows, rng)
            grid.add(0, nodes + nodes[:1])
            lines.append(nodes)
            loops.append(0)
        while len(lines) < n_lines:
            k = len(lines)
            target = rng.randint(lo, hi)
            placed = False
            for _try in range(40):
                own: set[Node] = set()
                if k == 0:  # the first line crosses the middle of the map
                    anchor = (cols // 2 + rng.randint(-2, 2), rows // 2 + rng.randint(-2, 2))
                    d = rng.randrange(8)
                else:  # later lines start from an existing station, so the network stays connected
                    candidates = sorted(n for n, ls in grid.node_lines.items() if len(ls) < MAX_LINES_PER_STATION)
                    anchor = rng.choice(candidates)
                    used = {i for i in range(8)
                            if frozenset((anchor, (anchor[0] + DIRS[i][0], anchor[1] + DIRS[i][1]))) in grid.edges}
                    free = [i for i in range(8) if i not in used and (i + 4) % 8 not in used]
                    if not free:
                        continue
                    d = rng.choice(free)
                trial = _Grid(cols, rows)  # walk on a copy so that a failed try leaves no trace
                trial.node_lines = {n: set(s) for n, s in grid.node_lines.items()}
                trial.edges, trial.diag_cells = set(grid.edges), set(grid.diag_cells)
                own.add(anchor)
                trial.node_lines.setdefault(anchor, set()).add(k)
                ahead = rng.randint(target // 3, target - 1 - target // 3)
                fwd = _walk(rng, trial, k, own, anchor, d, ahead, turn_p=0.25)
                back = _walk(rng, trial, k, own, anchor, (d + 4) % 8, target - 1 - len(fwd), turn_p=0.25)
                nodes = back[::-1] + [anchor] + fwd
                if len(nodes) >= max(4, lo - 1):
                    grid = trial
                    lines.append(nodes)
                    placed = True
                    break
            if not placed:
                break
        if len(lines) == n_lines:
            return lines, loops
    raise RuntimeError("could not lay out a network; the grid is too small for the level")


def generate_city(seed: int, difficulty: str = "middle", level: dict | None = None) -> City:
    """A deterministic synthetic city for (seed, difficulty).

    Lines have distinct vivid colours and names ("Line 3" or "Red Line"), stations have unique
    pronounceable names ending in " Station", interchanges are stations shared by several lines, and
    middle / hard maps may have a circle line (stored with its first station repeated at the end, as
    in the real Shanghai Line 4). `level`: the network's sizes, in place of LEVELS[difficulty] (the demo world's
    smaller cities, synthetic.DEMO_LEVELS).
    """
    if difficulty not in LEVELS:
        raise ValueError(f"difficulty must be one of {list(LEVELS)}, got {difficulty!r}")
    level = level or LEVELS[difficulty]
    # str seeds go through sha512 in `random`, so this is stable across processes and platforms
    rng = random.Random(f"rewardmap-city:{seed}:{difficulty}")
    lines, loops = _layout(rng, level)
    all_nodes = sorted({n for nodes in lines for n in nodes})
    names = make_station_names(rng, len(all_nodes))
    rng.shuffle(names)
    station_at = dict(zip(all_nodes, names))
    line_names, colours = _line_names(rng, len(lines))
    metro, colour_of, loop_names = {}, {}, []
    for k, nodes in enumerate(lines):
        stations = [station_at[n] for n in nodes]
        if k in loops:
            stations.append(stations[0])
            loop_names.append(line_names[k])
        metro[line_names[k]] = stations
        colour_of[line_names[k]] = colours[k]
    city_name = make_word(rng, (2, 3))
    if city_name[-1] not in "aeiou":
        city_name += rng.choice(["", "", "ia", "a", "on", "burg", "ford"])
    return City(name=city_name, slug=city_name.lower(), difficulty=difficulty, metro=metro, colours=colour_of,
                positions={station_at[n]: n for n in all_nodes}, grid=level["grid"], loops=loop_names)


def generate_metro(seed: int, difficulty: str = "middle") -> dict[str, list[str]]:
    """Just the metro data (line -> ordered, suffix-free station names) of `generate_city(seed, difficulty)`."""
    return generate_city(seed, difficulty).metro


# ---------------------------------------------------------------------------------------------------
# rendering


@lru_cache(maxsize=8)
def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """Pillow's bundled scalable font (Pillow >= 10.1), so no system TTF is needed."""
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # older Pillow: fixed-size bitmap font
        return ImageFont.load_default()


def _overlaps(a: tuple, b: tuple) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


class _Boxes:
    """Rectangles with weights in a coarse bucket grid, to score label positions quickly."""

    def __init__(self, cell: int):
        self.cell, self.buckets = cell, {}

    def _keys(self, r):
        c = self.cell
        return [(i, j) for i in range(int(r[0]) // c, int(r[2]) // c + 1) for j in range(int(r[1]) // c, int(r[3]) // c + 1)]

    def add(self, rect, weight):
        for k in self._keys(rect):
            self.buckets.setdefault(k, []).append((rect, weight))

    def cost(self, rect):
        seen, total = set(), 0
        for k in self._keys(rect):
            for item in self.buckets.get(k, ()):
                if id(item) not in seen and _overlaps(rect, item[0]):
                    seen.add(id(item))
                    total += item[1]
        return total


def render_map(city: City, path: str | Path) -> tuple[int, int]:
    """Draw `city` as a schematic metro map and save it as a PNG at `path`; returns (width, height).

    Lines in their colours (0/45/90 degrees), white station dots, black-ringed interchanges, station
    labels placed where they overlap least, a title and a legend of line names and colours. The output
    is byte-identical for the same city (no timestamps or other metadata in the PNG).
    """
    level = LEVELS[city.difficulty]
    sp, lw, fs = level["spacing"], level["width"], level["font"]
    cols, rows = city.grid
    font, title_font, legend_font = _font(fs), _font(int(fs * 2.2)), _font(int(fs * 1.2))
    margin, top = sp, sp + int(fs * 2.6)

    # legend layout: as many entries per row as fit under the map
    width = margin * 2 + (cols - 1) * sp
    entry_w = 70 + max(int(legend_font.getlength(line)) for line in city.metro) + 40
    per_row = max(1, (width - 2 * margin) // entry_w)
    legend_rows = -(-len(city.metro) // per_row)
    legend_h = 50 + legend_rows * int(fs * 2.2)
    height = top + (rows - 1) * sp + margin + legend_h

    img = Image.new("RGB", (width, height), (252, 252, 248))
    draw = ImageDraw.Draw(img)

    def px(node: Node) -> tuple[int, int]:
        return margin + node[0] * sp, top + node[1] * sp

    boxes = _Boxes(sp)
    # lines: thick segments with round joins
    for line, stations in city.metro.items():
        colour = city.colours[line]
        pts = [px(city.positions[s]) for s in stations]
        for a, b in zip(pts, pts[1:]):
            draw.line([a, b], fill=colour, width=lw)
            for t in (0.25, 0.5, 0.75):  # label placement avoids covering the lines
                x, y = a[0] + (b[0] - a[0]) * t, a[1] + (b[1] - a[1]) * t
                boxes.add((x - lw, y - lw, x + lw, y + lw), 3)
        for x, y in pts:
            draw.ellipse([x - lw / 2, y - lw / 2, x + lw / 2, y + lw / 2], fill=colour)

    # stations: interchanges get a larger white disc with a black ring
    lines_at: dict[str, int] = {}
    for stations in city.metro.values():
        for s in set(stations):
            lines_at[s] = lines_at.get(s, 0) + 1
    first_line = {}
    for line, stations in city.metro.items():
        for s in stations:
            first_line.setdefault(s, line)
    for s, node in city.positions.items():
        x, y = px(node)
        if lines_at[s] > 1:
            r = lw * 0.95 + 2
            draw.ellipse([x - r, y - r, x + r, y + r], fill="white", outline=(20, 20, 20), width=max(3, lw // 3))
        else:
            r = lw * 0.45
            draw.ellipse([x - r, y - r, x + r, y + r], fill="white", outline=city.colours[first_line[s]], width=2)
        boxes.add((x - r - 2, y - r - 2, x + r + 2, y + r + 2), 5)

    # labels: interchanges first; the first candidate position with the smallest overlap wins
    order = sorted(city.positions, key=lambda s: (-lines_at[s], city.positions[s]))
    gap = lw + 4
    for s in order:
        label = s.removesuffix(" Station")  # maps print the bare name
        x, y = px(city.positions[s])
        l, t, r, b = font.getbbox(label)
        w, h = r - l, b - t
        candidates = [(x + gap, y - h / 2), (x - gap - w, y - h / 2), (x - w / 2, y - gap - h), (x - w / 2, y + gap),
                      (x + gap * 0.7, y - gap * 0.7 - h), (x + gap * 0.7, y + gap * 0.7),
                      (x - gap * 0.7 - w, y - gap * 0.7 - h), (x - gap * 0.7 - w, y + gap * 0.7)]
        best = None
        for k, (lx, ly) in enumerate(candidates):
            rect = (lx - 2, ly - 2, lx + w + 2, ly + h + 2)
            if rect[0] < 2 or rect[1] < top - sp / 2 or rect[2] > width - 2 or rect[3] > height - legend_h:
                continue
            cost = boxes.cost(rect)
            if best is None or cost < best[0]:
                best = (cost, rect)
            if cost == 0:
                break
        if best is None:
            best = (0, (x + gap - 2, y - h / 2 - 2, x + gap + w + 2, y + h / 2 + 2))
        rect = best[1]
        draw.text((rect[0] + 2 - l, rect[1] + 2 - t), label, font=font, fill=(25, 25, 25),
                  stroke_width=2, stroke_fill=(252, 252, 248))
        boxes.add(rect, 10)

    # title and legend
    draw.text((margin * 0.5, fs * 0.8), f"{city.name} Metro", font=title_font, fill=(25, 25, 25))
    ly0 = height - legend_h + 20
    draw.line([(margin * 0.5, ly0 - 8), (width - margin * 0.5, ly0 - 8)], fill=(180, 180, 180), width=2)
    for k, line in enumerate(city.metro):
        row, colk = divmod(k, per_row)
        x0 = margin + colk * entry_w
        y0 = ly0 + 10 + row * int(fs * 2.2)
        draw.line([(x0, y0 + fs * 0.6), (x0 + 50, y0 + fs * 0.6)], fill=city.colours[line], width=max(lw, 8))
        draw.text((x0 + 62, y0), line, font=legend_font, fill=(25, 25, 25))

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format="PNG", compress_level=6)
    return width, height
