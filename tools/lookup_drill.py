"""How fast does a small transformer learn the map lookup the demo needs? A drill that isolates it (docs/demo.md).

    python -m tools.lookup_drill                            # the demo model's shape, Qwen2's initialisation (~80 s)
    python -m tools.lookup_drill --init 0.05 --steps 1200   # a larger initialisation: leaves chance (~3 min)
    python -m tools.lookup_drill --init 0.05 --lr 1e-3 --induction --extra-vocab 1122 --steps 300  # the demo's start

Each training sequence is a small map read by station, one row per station: its name, then its code (the set of
lines through it, one token: `Alder AC` for lines A and C), then a newline; a separator; then the same rows again
in another order. The model learns next-token prediction of the second half only. A code there is predictable
only by finding the row of the name just written in the first half and reading the token after it: "which lines
is this station on", the lookup behind the demo's torf1 / torf2 / counting2 answers, with nothing else to learn
(no question template, no tokenizer: names and codes are plain token ids). A 2-layer transformer does it with an
induction head (one head marks each token with the one before it, a second finds the earlier position marked
with the current token), the circuit small models are known to sit on a plateau before finding.

The model is the demo's Qwen2 text model (tiny_model.TEXT_SHAPE's hidden size, layers and heads; the vocabulary is
the drill's own), trained with AdamW (no weight decay, linear warmup then a constant rate, gradients clipped at 1)
on fresh random maps every step. Printed every 100 steps: the training loss and the code accuracy (the share of
second-half codes predicted right; chance is 1 / codes); at the end, the code accuracy by number of rows, on
`--probe` fresh maps of each size. `--prev-token-head A`: layer 1's head 0 starts as a previous-token head (its query
and key biases set so that, under RoPE, its score peaks one position back; A is their size), to test whether
the first half of the circuit is what the plateau waits for. `--induction`: the model starts with the demo model's
whole induction circuit (tiny_model.set_induction_circuit). `--extra-vocab N`: N more token ids that never occur,
to give the model the demo tokenizer's size (1,122 more: 1,440).
"""
from __future__ import annotations

import argparse
import math
import random
import statistics
import time

import torch
import torch.nn.functional as F

from offline.tiny_model import INDUCTION, TEXT_SHAPE, set_induction_circuit, set_position_head
from plumbing import cli

NEWLINE, SEPARATOR, FIRST_NAME = 1, 2, 3  # token ids (0: padding)


def drill_map(rng: random.Random, rows: int, names: int, codes: int, order: str = "shuffled", code_first: bool = False
              ) -> tuple[list[int], list[int]]:
    """One sequence and its labels (-100 where not learned): `rows` distinct names with random codes, then the rows
    again ("shuffled": in a random order; "same": in the same order, a copy at a fixed offset). `code_first`: the
    first half's rows read code, name (the second half's stay name, code)."""
    table = [(FIRST_NAME + n, FIRST_NAME + names + rng.randrange(codes)) for n in rng.sample(range(names), rows)]
    again = rng.sample(table, rows) if order == "shuffled" else table
    first = [t for name, code in table for t in ((code, name) if code_first else (name, code)) + (NEWLINE,)]
    first.append(SEPARATOR)
    second = [t for name, code in again for t in (name, code, NEWLINE)]
    return first + second, [-100] * len(first) + second


def batch_of(maps: list[tuple[list[int], list[int]]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded token ids and labels of a list of sequences."""
    width = max(len(ids) for ids, _ in maps)
    ids = torch.zeros(len(maps), width, dtype=torch.long)
    labels = torch.full((len(maps), width), -100)
    for i, (seq, lab) in enumerate(maps):
        ids[i, : len(seq)] = torch.tensor(seq)
        labels[i, : len(lab)] = torch.tensor(lab)
    return ids, labels


def build_model(names: int, codes: int, init: float, hidden: int, layers: int, heads: int, kv_heads: int,
                prev_token_head: float = 0.0, seed: int = 0, induction: bool = False):
    """The drill's Qwen2 causal LM, weights drawn with standard deviation `init` (Qwen2's default 0.02);
    `prev_token_head`: layer 1's head 0 starts looking one position back (bias size); `induction`: the model starts
    with the demo model's whole induction circuit (tiny_model.set_induction_circuit)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=FIRST_NAME + names + codes, hidden_size=hidden, intermediate_size=4 * hidden,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         max_position_embeddings=512, tie_word_embeddings=True, initializer_range=init,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e4})
    model = Qwen2ForCausalLM(config)
    if prev_token_head:
        set_position_head(model.model.layers[0].self_attn, 0, hidden // heads, prev_token_head, back=1)
    if induction:
        set_induction_circuit(model, seed=seed, **INDUCTION)
    return model


def code_accuracy(logits: torch.Tensor, labels: torch.Tensor, first_code: int) -> torch.Tensor:
    """Per sequence: the share of its learned codes predicted right (logits at position t predict label t + 1)."""
    target = labels[:, 1:]
    is_code = target >= first_code
    right = (logits[:, :-1].argmax(-1) == target) & is_code
    return right.sum(1) / is_code.sum(1).clamp(min=1)


def drill(steps: int = 600, batch: int = 32, lr: float = 3e-3, init: float = 0.02, names: int = 300, codes: int = 15,
          min_rows: int = 2, max_rows: int = 12, order: str = "shuffled", hidden: int = TEXT_SHAPE["hidden_size"],
          layers: int = TEXT_SHAPE["num_layers"], heads: int = TEXT_SHAPE["num_heads"],
          kv_heads: int = TEXT_SHAPE["num_kv_heads"], prev_token_head: float = 0.0, warmup: int = 30,
          code_first: bool = False, probe: int = 64, seed: int = 0, every: int = 100, verbose: bool = True,
          induction: bool = False, extra_vocab: int = 0) -> dict:
    """Train on the drill; returns the last window's loss and code accuracy and the probe's accuracy by rows."""
    if not 1 <= min_rows <= max_rows <= names:
        raise ValueError(f"--min-rows / --max-rows: need 1 <= min <= max <= --names, "
                         f"got {min_rows}, {max_rows}, {names}")
    if order not in ("shuffled", "same"):
        raise ValueError(f"--order must be shuffled or same, got {order!r}")
    model = build_model(names, codes + extra_vocab, init, hidden, layers, heads, kv_heads, prev_token_head, seed,
                        induction)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    rng, first_code = random.Random(seed), FIRST_NAME + names
    losses, accuracies, start = [], [], time.time()
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / warmup)
        ids, labels = batch_of([drill_map(rng, rng.randint(min_rows, max_rows), names, codes, order, code_first)
                                for _ in range(batch)])
        logits = model(input_ids=ids).logits
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())
        accuracies.append(code_accuracy(logits.detach(), labels, first_code).mean().item())
        if verbose and ((step + 1) % every == 0 or step + 1 == steps):
            print(f"step {step + 1:>5}  {time.time() - start:5.0f} s  loss {statistics.mean(losses[-every:]):.3f}  "
                  f"code accuracy {statistics.mean(accuracies[-every:]):.3f}", flush=True)
    by_rows = {}
    model.eval()
    with torch.no_grad():
        for rows in range(min_rows, max_rows + 1):
            ids, labels = batch_of([drill_map(rng, rows, names, codes, order, code_first)
                                    for _ in range(probe)])
            by_rows[rows] = round(code_accuracy(model(input_ids=ids).logits, labels, first_code).mean().item(), 3)
    result = {"loss": statistics.mean(losses[-every:]) if losses else math.nan,
              "code_accuracy": statistics.mean(accuracies[-every:]) if accuracies else math.nan,
              "chance": 1 / codes, "by_rows": by_rows, "seconds": round(time.time() - start, 1)}
    if verbose:
        print("code accuracy by rows (fresh maps):", " ".join(f"{k}: {v:.2f}" for k, v in by_rows.items()))
    return result


def main(argv=None) -> dict:
    """The command line: run the drill and print its progress."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--batch", type=int, default=32, help="maps per step")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--init", type=float, default=0.02, help="standard deviation of the initial weights")
    ap.add_argument("--names", type=int, default=300, help="station names (the demo world's pool: 300)")
    ap.add_argument("--codes", type=int, default=15, help="codes (the non-empty sets of 4 lines: 15)")
    ap.add_argument("--min-rows", type=int, default=2)
    ap.add_argument("--max-rows", type=int, default=12)
    ap.add_argument("--order", choices=("shuffled", "same"), default="shuffled", help="the second half's row order")
    ap.add_argument("--code-first", action="store_true", help="the first half's rows read code, name")
    ap.add_argument("--hidden", type=int, default=TEXT_SHAPE["hidden_size"])
    ap.add_argument("--layers", type=int, default=TEXT_SHAPE["num_layers"])
    ap.add_argument("--heads", type=int, default=TEXT_SHAPE["num_heads"])
    ap.add_argument("--kv-heads", type=int, default=TEXT_SHAPE["num_kv_heads"])
    ap.add_argument("--prev-token-head", type=float, default=0.0, metavar="A",
                    help="start layer 1's first head as a previous-token head of bias size A (0: off)")
    ap.add_argument("--induction", action="store_true",
                    help="start with the demo model's induction circuit (tiny_model.set_induction_circuit)")
    ap.add_argument("--extra-vocab", type=int, default=0, metavar="N",
                    help="N more token ids that never occur (the demo tokenizer's size: 1122)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    return drill(args.steps, args.batch, args.lr, args.init, args.names, args.codes, args.min_rows, args.max_rows,
                 args.order, args.hidden, args.layers, args.heads, args.kv_heads, args.prev_token_head,
                 code_first=args.code_first, seed=args.seed, induction=args.induction, extra_vocab=args.extra_vocab)


if __name__ == "__main__":
    cli.run(main)
