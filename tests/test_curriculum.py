from collections import Counter
from types import SimpleNamespace

import pytest

from curriculum import batches, build_curriculum, group_of, stage_names

TYPES = ["torf1", "torf2", "counting1", "counting2", "counting3", "planning"]


def make(n_per_type=10):
    return [SimpleNamespace(id=f"{q}-{i}", qtype=q) for q in TYPES for i in range(n_per_type)]


def test_fine_order_and_grouping():
    stages = build_curriculum(make(), "fine", seed=0)
    assert [name for name, _ in stages] == ["judgement", "counting", "planning"]
    judgement, counting, planning = (s for _, s in stages)
    assert {s.qtype for s in judgement} == {"torf1", "torf2"} and len(judgement) == 20
    # counting2 + counting3 come first (mixed), then every counting1
    assert [s.qtype for s in counting[20:]] == ["counting1"] * 10
    assert {s.qtype for s in counting[:20]} == {"counting2", "counting3"}
    assert {s.qtype for s in planning} == {"planning"}


def test_shuffle_is_local_and_seeded():
    samples = make(30)
    a = build_curriculum(samples, "fine", seed=1)
    b = build_curriculum(samples, "fine", seed=1)
    c = build_curriculum(samples, "fine", seed=2)
    ids = lambda st: [[s.id for s in part] for _, part in st]
    assert ids(a) == ids(b)
    assert ids(a) != ids(c)
    # torf1 and torf2 are interleaved, not one block after the other
    qs = [s.qtype for s in a[0][1]]
    assert qs != sorted(qs) and qs != sorted(qs, reverse=True)
    for _, part in a:
        assert len({s.id for s in part}) == len(part)


def test_variants_cover_every_sample_once():
    samples = make(7)
    for variant in ("fine", "coarse", "none"):
        stages = build_curriculum(samples, variant, seed=0)
        got = Counter(s.id for _, part in stages for s in part)
        assert got == Counter(s.id for s in samples), variant
    coarse = build_curriculum(samples, "coarse", seed=0)
    assert [n for n, _ in coarse] == ["perception", "planning"]
    assert all(s.qtype != "planning" for s in coarse[0][1])
    assert stage_names("none") == ["all"]


def test_unknown_variant_and_qtype_are_errors():
    with pytest.raises(ValueError, match="curriculum variant"):
        build_curriculum(make(1), "zigzag")
    with pytest.raises(ValueError, match="no stage for qtype"):
        build_curriculum([SimpleNamespace(id="x", qtype="torf9")], "fine")


def test_batches_one_pass_partial_and_extra_passes():
    items = list(range(10))
    assert batches(items, 4) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert batches(items, 4, max_steps=2) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    more = batches(items, 5, max_steps=5, seed=3)
    assert more[:2] == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]
    assert sorted(more[2] + more[3]) == items and len(more) == 5
    assert more == batches(items, 5, max_steps=5, seed=3)
    assert batches([], 4) == []
    with pytest.raises(ValueError):
        batches(items, 0)


def test_extra_passes_keep_the_stage_sub_order():
    """Asking for more steps than one pass: every pass still has counting2/3 before counting1."""
    counting = build_curriculum(make(8), "fine", seed=0)[1][1]
    steps = batches(counting, 4, max_steps=12, seed=0, group=group_of("fine", "counting"))
    passes = [sum(steps[k : k + 6], []) for k in (0, 6)]
    for p in passes:
        assert [s.qtype == "counting1" for s in p] == [False] * 16 + [True] * 8
    assert [s.id for s in passes[0]] != [s.id for s in passes[1]]  # but reshuffled inside the groups


def test_drop_last_drops_the_partial_batch_of_every_pass():
    stage = [SimpleNamespace(qtype="torf1", i=i) for i in range(10)]
    kept = batches(stage, 4)
    assert [len(b) for b in kept] == [4, 4, 2]
    dropped = batches(stage, 4, drop_last=True)
    assert [len(b) for b in dropped] == [4, 4] and dropped == kept[:2]
    assert [len(b) for b in batches(stage, 4, max_steps=5, drop_last=True)] == [4, 4, 4, 4, 4]
    assert batches(stage[:3], 4, max_steps=3, drop_last=True) == []
