import random
from collections import Counter
from types import SimpleNamespace

import pytest

import curriculum
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


def _runs(qtypes):
    """Number of maximal runs of equal consecutive values (a list sorted into blocks has one per value)."""
    return sum(1 for k, q in enumerate(qtypes) if k == 0 or q != qtypes[k - 1])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_none_mixes_all_six_types_in_one_shuffled_stage(seed):
    """`none`: one stage, planning interleaved with the Plus types from the start (not Plus, then planning)."""
    samples = make(20)
    stages = build_curriculum(samples, "none", seed=seed)
    assert [name for name, _ in stages] == ["all"]
    qs = [s.qtype for s in stages[0][1]]
    assert sorted(qs) == sorted(s.qtype for s in samples)
    # the first and the last 30 of 120 hold planning and Plus questions alike (a coarse-like order has only Plus
    # first and only planning last), and at least four of the six types
    for window in (qs[:30], qs[-30:]):
        assert "planning" in window and any(q != "planning" for q in window), window
        assert len(set(window)) >= 4, window
    assert _runs(qs) > 60  # 120 items of 6 types in random order: ~100 runs; blocks by type: 6
    # and the stage is shuffled by its own seed
    assert qs != [s.qtype for s in build_curriculum(samples, "none", seed=seed + 10)[0][1]]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_coarse_interleaves_the_five_plus_types_then_planning(seed):
    samples = make(20)
    (p_name, perception), (q_name, planning) = build_curriculum(samples, "coarse", seed=seed)
    assert (p_name, q_name) == ("perception", "planning")
    qs = [s.qtype for s in perception]
    assert sorted(qs) == sorted(q for q in TYPES if q != "planning" for _ in range(20))
    assert [s.qtype for s in planning] == ["planning"] * 20
    assert len(set(qs[:20])) >= 4 and len(set(qs[-20:])) >= 4, qs  # mixed from start to end, not type by type
    assert _runs(qs) > 50  # 100 items of 5 types shuffled together: ~80 runs; one block per type: 5


@pytest.mark.parametrize("stage_size,batch_size,max_steps", [(24, 4, 15), (22, 4, 20), (21, 5, 13)])
def test_fine_sub_order_holds_in_every_pass(stage_size, batch_size, max_steps):
    """train.py cuts each stage with `group_of`: counting2/3 before counting1 in every pass (partial passes and
    partial batches included), judgement's torf1/torf2 still interleaved, every pass a permutation of the stage."""
    rng = random.Random(stage_size)
    samples = [SimpleNamespace(id=f"{q}-{i}", qtype=q)
               for q in TYPES for i in range(rng.randint(stage_size // 3, stage_size // 2))]
    for name, stage in build_curriculum(samples, "fine", seed=3):
        steps = batches(stage, batch_size, max_steps=max_steps, seed=3, group=group_of("fine", name))
        assert len(steps) == max_steps
        flat = [s for b in steps for s in b]
        passes = [flat[k : k + len(stage)] for k in range(0, len(flat), len(stage))]
        assert len(passes) >= 3, name  # at least two passes after the first
        for k, p in enumerate(passes):
            full = len(p) == len(stage)
            if full:
                assert sorted(s.id for s in p) == sorted(s.id for s in stage), (name, k)
            if name == "counting":
                is1 = [s.qtype == "counting1" for s in p]
                assert is1 == sorted(is1), (name, k)  # no counting2/3 after a counting1
                if full:
                    assert sum(is1) == sum(s.qtype == "counting1" for s in stage)
            elif name == "judgement" and full:
                assert _runs([s.qtype for s in p]) > 4, (name, k)  # still mixed, not torf1 then torf2
        ids = [[s.id for s in p] for p in passes if len(p) == len(stage)]
        assert len({tuple(x) for x in ids}) == len(ids), name  # each pass reshuffled


def test_replay_adds_earlier_questions_to_every_batch():
    from curriculum import with_replay

    now = [SimpleNamespace(qtype="planning", i=i) for i in range(10)]
    earlier = [SimpleNamespace(qtype="torf1", i=100 + i) for i in range(3)]
    steps = batches(now, 4)  # 4, 4, 2
    mixed = with_replay(steps, earlier, 0.5, seed=0, stage="planning")
    assert [len(b) for b in mixed] == [6, 6, 3]  # round(0.5 x 4) = 2, round(0.5 x 2) = 1 added per batch
    assert [b[: len(s)] for b, s in zip(mixed, steps)] == steps  # the stage's own questions all kept, in order
    added = Counter(q.i for b, s in zip(mixed, steps) for q in b[len(s):])
    assert set(added) == {100, 101, 102} and sorted(added.values()) == [1, 2, 2]  # cycling: about equally often
    assert with_replay(steps, earlier, 0.0) == steps and with_replay(steps, [], 0.5) == steps
    assert with_replay(steps, earlier, 0.5, seed=0, stage="planning") == mixed  # seeded


def test_continuous_batches_are_the_released_loaders():
    """One stream over the ordered stages: batches cross stage boundaries and run in the stage they start in;
    only full batches, and the last full one is dropped (the released trainer's off-by-one)."""
    stages = [("judgement", list("abcde")), ("counting", list("fgh")), ("planning", list("ijklmn"))]
    got = curriculum.continuous_batches(stages, 4)  # 14 samples: 3 full batches, the last of them dropped
    assert got == {"judgement": [list("abcd"), list("efgh")], "counting": [], "planning": []}
    got = curriculum.continuous_batches(stages, 3)  # 4 full batches (abc def ghi jkl), the last dropped; mn partial
    assert got == {"judgement": [list("abc"), list("def")], "counting": [list("ghi")], "planning": []}
    assert curriculum.continuous_batches(stages, 20) == {"judgement": [], "counting": [], "planning": []}
