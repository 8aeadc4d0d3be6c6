"""What every command (train.py, eval.py, data.py, sparsity.py, bench.py) shares: user errors as one line,
results as strict JSON, the CUDA allocator's setting.

    if __name__ == "__main__":
        cli.run(main)            # `error: <what, where>` and exit 2 on a user error; --debug: full traceback
"""
from __future__ import annotations

import json
import math
import os
import sys

USER_ERRORS = (ValueError, OSError, ImportError)
"""What a user can cause and fix: a bad flag value or dataset row (ValueError, whose messages name the flag,
or the file, row and field), a missing or unreadable file (OSError), a missing optional package (ImportError,
whose message names it). Anything else is a bug and keeps its traceback."""


def run(main, argv: list[str] | None = None):
    """Call `main(argv)`; a user error prints `error: <message>` (on one line) to stderr and exits with status 2,
    unless `--debug` is among the arguments (then the traceback is shown). Sets `cuda_allocator_defaults` first."""
    cuda_allocator_defaults()
    args = sys.argv[1:] if argv is None else argv
    try:
        return main(argv)
    except USER_ERRORS as e:
        if "--debug" in args:
            raise
        print("error: " + " ".join(str(e).split("\n")), file=sys.stderr)  # one line, whatever the message
        sys.exit(2)


def cuda_allocator_defaults() -> None:
    """PyTorch's CUDA allocator with expandable segments (`PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True`), unless
    the user configured it (that variable or PYTORCH_ALLOC_CONF). A GRPO step alternates a rollout (a large KV
    cache) with an update (activations, gradients) of other sizes: fixed segments fragment, and the cached blocks
    of one phase cannot serve the next. Read when CUDA first allocates, so set before anything runs."""
    if "PYTORCH_CUDA_ALLOC_CONF" not in os.environ and "PYTORCH_ALLOC_CONF" not in os.environ:
        os.environ["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"


def strict(obj):
    """`obj` with every non-finite float (NaN, inf) replaced by None, so it can be written as strict JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: strict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict(v) for v in obj]
    return obj


def dumps(obj, **kwargs) -> str:
    """`json.dumps` that writes strict JSON: NaN and infinities become `null` (RFC 8259 has no NaN)."""
    return json.dumps(strict(obj), allow_nan=False, **kwargs)
