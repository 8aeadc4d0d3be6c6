"""tools/lookup_drill.py: the drill's maps, its previous-token head, its accuracy and a short run; the demo model's
induction circuit (tiny_model.set_induction_circuit), which reads the drill's maps before any training."""
import random

import pytest
import torch

from offline import tiny_model
from tools import lookup_drill as drill


def test_drill_map_second_half_repeats_each_rows_code_and_only_it_is_learned():
    names, codes = 50, 15
    seq, labels = drill.drill_map(random.Random(3), 6, names, codes)
    sep = seq.index(drill.SEPARATOR)
    first, second = seq[:sep], seq[sep + 1 :]
    assert len(first) == len(second) == 18 and labels[: sep + 1] == [-100] * (sep + 1) and labels[sep + 1 :] == second
    table = {first[i]: first[i + 1] for i in range(0, 18, 3)}
    assert len(table) == 6 and all(drill.FIRST_NAME <= n < drill.FIRST_NAME + names for n in table)
    assert all(drill.FIRST_NAME + names <= c < drill.FIRST_NAME + names + codes for c in table.values())
    assert {second[i]: second[i + 1] for i in range(0, 18, 3)} == table
    assert all(second[i] == drill.NEWLINE for i in range(2, 18, 3))
    same, _ = drill.drill_map(random.Random(3), 6, names, codes, order="same")
    assert same[sep + 1 :] == same[:sep]
    flipped, _ = drill.drill_map(random.Random(3), 6, names, codes, code_first=True)  # first half: code, name
    assert flipped[sep + 1 :] == second and {flipped[i + 1]: flipped[i] for i in range(0, 18, 3)} == table


def test_code_accuracy_counts_codes_only():
    first_code = 10
    labels = torch.tensor([[-100, 3, 11, 1, 12], [-100, 4, 13, 1, -100]])
    logits = torch.zeros(2, 5, 20)
    # position t predicts label t + 1: row 0 gets code 11 right and code 12 wrong; row 1 gets its one code right
    for row, t, token in ((0, 1, 11), (0, 3, 14), (0, 0, 3), (1, 1, 13)):
        logits[row, t, token] = 1.0
    assert drill.code_accuracy(logits, labels, first_code).tolist() == [0.5, 1.0]


def test_previous_token_head_attends_one_position_back():
    model = drill.build_model(names=40, codes=5, init=0.02, hidden=64, layers=1, heads=2, kv_heads=2,
                              prev_token_head=5.0)
    model.config._attn_implementation = "eager"
    ids = torch.randint(drill.FIRST_NAME, 40, (3, 24))
    attention = model(input_ids=ids, output_attentions=True).attentions[0][:, 0]  # [batch, query, key], head 1
    peaks = attention[:, 2:].argmax(-1)
    assert (peaks == torch.arange(1, 23)).all()
    assert attention[:, 12, 11].min() > 0.5


def test_short_run_reports_every_row_count_and_refuses_bad_rows(capsys):
    result = drill.drill(steps=3, batch=4, names=30, min_rows=2, max_rows=4, probe=2, verbose=True)
    assert set(result["by_rows"]) == {2, 3, 4} and result["chance"] == 1 / 15
    assert 0.0 <= result["code_accuracy"] <= 1.0 and result["loss"] > 0
    assert "code accuracy by rows" in capsys.readouterr().out
    with pytest.raises(ValueError, match="--min-rows / --max-rows"):
        drill.drill(steps=1, min_rows=5, max_rows=3)
    with pytest.raises(ValueError, match="--order"):
        drill.drill(steps=1, order="reversed")


def _accuracy_untrained(induction: bool, seed: int = 0) -> float:
    model = drill.build_model(names=300, codes=15, init=tiny_model.TEXT_INIT, hidden=128, layers=2, heads=4, kv_heads=2,
                              seed=seed, induction=induction)
    rng = random.Random(seed)
    ids, labels = drill.batch_of([drill.drill_map(rng, rng.randint(2, 12), 300, 15) for _ in range(32)])
    with torch.no_grad():
        return drill.code_accuracy(model(input_ids=ids).logits, labels, drill.FIRST_NAME + 300).mean().item()


@pytest.mark.parametrize("seed", [0, 1])
def test_induction_circuit_reads_the_map_before_training_and_a_random_model_does_not(seed):
    # the circuit finds the row of the name just written and writes its code: right on most rows at step 0
    assert _accuracy_untrained(induction=True, seed=seed) > 0.7
    assert _accuracy_untrained(induction=False, seed=seed) < 0.2  # chance is 1 / 15


def test_induction_circuit_layer_one_heads_look_one_back_and_at_themselves():
    model = drill.build_model(names=40, codes=5, init=0.05, hidden=128, layers=2, heads=4, kv_heads=2, induction=True)
    model.config._attn_implementation = "eager"
    ids = torch.randint(drill.FIRST_NAME, 40, (2, 24))
    attention = model(input_ids=ids, output_attentions=True).attentions[0]  # layer 1: [batch, head, query, key]
    assert (attention[:, 0, 2:].argmax(-1) == torch.arange(1, 23)).all()  # head 0: the token before
    assert (attention[:, 2, 2:].argmax(-1) == torch.arange(2, 24)).all()  # head 2 (key head 1): the token itself


def test_induction_circuit_refuses_a_model_too_small_for_it():
    with pytest.raises(ValueError, match="set_induction_circuit: needs >= 2 layers"):
        drill.build_model(names=40, codes=5, init=0.05, hidden=64, layers=1, heads=2, kv_heads=2, induction=True)


def test_a_text_tiny_model_too_small_for_the_circuit_is_built_without_it(tmp_path):
    from model import build_tiny_policy

    small = build_tiny_policy(seed=0, cache_dir=str(tmp_path), text_only=True, hidden_size=32, num_layers=1,
                              num_heads=2, num_kv_heads=1)
    assert not tiny_model.holds_induction_circuit(small.model.config)
    demo_shape = build_tiny_policy(seed=0, cache_dir=str(tmp_path), text_only=True, **tiny_model.TEXT_SHAPE)
    assert tiny_model.holds_induction_circuit(demo_shape.model.config)
    second = demo_shape.model.model.layers[1].self_attn  # the built match: query and key rows off the slow pairs are 0
    assert second.q_proj.weight[:10].abs().max() == 0 and second.q_proj.weight[10:16].abs().max() > 0
