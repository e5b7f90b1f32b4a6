"""Write docs/models.md: which model families SDP trains, at block and neuron level, under forward and
backward masking, or the error a user sees.

    python scripts/models_table.py --out docs/models.md

The families are the cases of tests/engine/test_model_families.py (``CASES``), each a tiny randomly
initialised model built in code; each cell is that test file's ``one_step`` check: 4 simulated
workers at coverage 0.5 train one step, and the assembled model loads strictly into a fresh instance
with every weight matrix of its blocks trained. The test suite regenerates this table and fails when
the committed one differs.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMAND = "python scripts/models_table.py --out docs/models.md"
COLUMNS = [("blocks", "forward"), ("blocks", "backward"), ("neurons", "forward"), ("neurons", "backward")]


def cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def table() -> str:
    sys.path[:0] = [os.path.join(REPO, "tests"), os.path.join(REPO, "tests", "engine")]
    from test_model_families import CASES, one_step

    header = "| Family | blocks path | " + " | ".join(
        f"{'block' if level == 'blocks' else 'neuron'} level, {masking} masking" for level, masking in COLUMNS) + " |"
    lines = [header, "|" + " --- |" * (2 + len(COLUMNS))]
    counts = [0, 0]
    for family, builder, path in CASES:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cells = [one_step(builder, path, level, masking) for level, masking in COLUMNS]
        counts[0] += all(c == "works" for c in cells[:2])
        counts[1] += all(c == "works" for c in cells[2:])
        lines.append(f"| {cell(family)} | `{path}` | " + " | ".join(cell(c) for c in cells) + " |")
    intro = f"""# Model compatibility

Regenerate with `{COMMAND}` (the test suite fails when this file is stale).

Which model families SDP trains, at block level (`blocks=`) and neuron level (`neurons=`), under
forward and backward masking. Each family is a tiny randomly initialised model built in code (the
cases of `tests/engine/test_model_families.py`); "works" means 4 simulated workers at coverage 0.5
train one step and the assembled model loads with `strict=True` into a fresh instance, every weight
matrix of its blocks trained. Otherwise the cell holds the exact error a user sees.

Working at block level (both maskings): {counts[0]} families; at neuron level: {counts[1]} families.

Neuron level recognises, inside each block: plain MLPs (`fc1`/`fc2`, `c_fc`/`c_proj`, `up_proj`/`down_proj`,
...; BERT-style `intermediate.dense`/`output.dense`), gated MLPs (`gate_proj`/`up_proj`/`down_proj`),
attention with q/k/v/o projections (`q_proj`/`k_proj`/`v_proj`/`o_proj`, ...; BERT-style
`self.query/key/value` or `attention.query/key/value` beside `output.dense`), fused qkv attention (`qkv`,
GPT-2's `c_attn`/`c_proj`) and conv-norm-conv residual blocks. Projections are `nn.Linear` or Hugging
Face's `Conv1D`. Hugging Face blocks cannot be traced by torch.fx, so at block level a dropped block
is the identity.

"""
    return intro + "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.path.join(REPO, "docs", "models.md"))
    args = parser.parse_args()
    text = table()
    with open(args.out, "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
