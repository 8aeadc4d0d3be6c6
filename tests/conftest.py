"""Shared fixtures and helpers: the tiny offline policies (built once per session into a temp cache), colour
images, and the real metro files shipped with the tests."""
import copy
import dataclasses
from dataclasses import dataclass
import os
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from transit.metro import Sample, load_metro, route_text  # noqa: E402
import model as M  # noqa: E402

# four cities of the released ReasonMap metro files (source and licence: tests/data/reasonmap-metro/README.md)
REAL_METRO = Path(__file__).resolve().parent / "data" / "reasonmap-metro"
REAL_CITIES = ("singapore/singapore.json", "china/shanghai.json", "china/beijing.json", "america/new_york.json")

COLOUR_Q = 'What colour fills the image: red or blue? Put your answer in one "\\boxed{}".'


@dataclass
class R:
    """A reward's parts, as rewards.reward returns them: what reward functions written in tests return."""
    total: float
    format: float = 0.0
    correctness: float = 0.0
    detail: float = 0.0
    weight: float = 1.0


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("tiny-model")


@pytest.fixture(scope="session")
def tiny_vlm(tiny_cache):
    """Tiny Qwen2.5-VL policy. Shared: tests that train must use `fresh(policy)`."""
    return M.build_tiny_policy(seed=0, cache_dir=tiny_cache)


@pytest.fixture(scope="session")
def tiny_lm(tiny_cache):
    return M.build_tiny_policy(seed=0, cache_dir=tiny_cache, text_only=True)


def fresh(policy, scale: float | None = None, seed: int = 0):
    """A private copy of `policy`; with `scale`, weights re-drawn N(0, scale) (norms kept) so that a
    random model's greedy decode is not one repeated token (a stronger check of positions / caching)."""
    policy = dataclasses.replace(policy, model=copy.deepcopy(policy.model))
    if scale is not None:
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in policy.model.named_parameters():
                if p.dim() >= 2:
                    p.copy_(torch.randn(p.shape, generator=g) * scale)
    return policy


def colour_samples(directory, colours, sizes=None):
    """One Sample per colour: an image filled with it (sizes vary so prompts have different lengths)."""
    out = []
    for i, c in enumerate(colours):
        w, h = sizes[i] if sizes else (60 + 23 * i % 80, 60 + 37 * i % 80)
        path = os.path.join(directory, f"{i}-{c}.png")
        Image.new("RGB", (w, h), (220, 30, 30) if c == "red" else (30, 30, 220)).save(path)
        out.append(Sample(id=str(i), qtype="colour", question=COLOUR_Q, answer=c, image=path, metro={}))
    return out


def text_samples(n):
    metro = {"Line 1": ["Alder Station", "Birch Station", "Cedar Station"], "Line 2": ["Birch Station", "Dove Station"]}
    qs = ["Is Alder Station on Line 2?", "How many lines pass through Birch Station?",
          "How do I get from Alder Station to Dove Station?"]
    return [Sample(id=str(i), qtype="torf2", question=qs[i % 3] * (1 + i % 2), answer="no", image=None,
                   metro=metro) for i in range(n)]


@pytest.fixture(scope="session")
def sg():
    """The real Singapore metro data: the paper's worked examples are on it."""
    return load_metro(REAL_METRO / "singapore" / "singapore.json")


def ans(*segments):
    """Answer text from (line, dep, arr) triples."""
    return route_text(list(segments))


def plus_sample(qtype, answer, difficulty="easy", **kw):
    """A ReasonMap-Plus question with just the fields the reward and the scorers read."""
    return Sample(id="x", qtype=qtype, question="", answer=answer, image=None, metro={}, map_difficulty=difficulty, **kw)


# A hand-made chain city: Line k runs from the k-th to the (k+1)-th interchange.
CHAIN = {
    "Line 1": ["A", "B", "C"],
    "Line 2": ["C", "D", "E"],
    "Line 3": ["E", "F", "G"],
    "Line 4": ["G", "H", "I"],
    "Line 5": ["I", "J", "K"],
    "Line 6": ["K", "L", "M"],
    "Loop": ["A", "M"],
}
