"""The few-rows CPU route is chosen by a measurement on the pair's own layers, recorded, and can be imposed."""
from __future__ import annotations

import dataclasses

from tad_core.cpu_route import MARGIN, RouteChoice, measure
from tad_core.engine import SmallRowsLinear
from tad_core.models import load_pair


def test_route_follows_the_measurement_and_is_recorded(tiny_model_dir, tiny_lora_dir):
    pair = load_pair(str(tiny_model_dir), adapter=tiny_lora_dir)
    choice = measure(pair.model)
    assert [rows for rows, _, _ in choice.measured] == [2, 4, 8, 16, 32]
    assert all(lin > 0 and mm > 0 for _, lin, mm in choice.measured)
    wins = tuple(rows for rows, lin, mm in choice.measured if mm < MARGIN * lin)
    assert choice.rows == wins and choice.route == ("mm" if wins else "linear")
    assert "measured on this CPU" in choice.describe()
    few = SmallRowsLinear.for_pair(pair)
    recorded = pair.info["few_rows_route"]
    assert isinstance(recorded, RouteChoice) and recorded.measured
    assert (few is not None) == (recorded.route == "mm")  # the wrapper exists exactly when the route won
    # a call's row count is judged by the next measured count up: 3 rows by 4, 9 by 16
    assert few is None or few.rows == {r for r in range(2, 33) if 1 << (r - 1).bit_length() in recorded.rows}
    assert SmallRowsLinear.for_pair(pair) is few  # measured once per pair


def test_the_route_applies_to_the_measured_row_counts_only(tiny_pair):
    """With the route imposed at 8 rows (measured counts 2, 4, 8, 16, 32: a call of 5-8 rows takes it), a paired
    forward of 8 rows takes it and one of 16 rows or 4 does not."""
    import torch

    from tad_core.engine import PairedRunner, left_pad, positions_from_mask

    pair = dataclasses.replace(tiny_pair, info={"few_rows_route": RouteChoice("mm", (8,), reason="imposed")})
    few = SmallRowsLinear.for_pair(pair)
    assert few is not None and few.rows == {5, 6, 7, 8}
    tok = pair.tokenizer
    for prompts, takes in ((["a"] * 4, True), (["a"] * 8, False), (["a"] * 2, False)):  # 8 rows, 16, 4
        ids, mask = left_pad([tok(p)["input_ids"] for p in prompts], tok.pad_token_id)
        runner = PairedRunner(pair, [True] * len(prompts), [True] * len(prompts))
        with torch.no_grad():
            runner.forward(ids, mask, positions_from_mask(mask), logits_to_keep=1)
            before = few.calls
            ids = torch.full((len(prompts), 1), 5)
            mask = torch.cat([mask, mask.new_ones(len(prompts), 1)], dim=1)
            runner.forward(ids, mask, positions_from_mask(mask)[:, -1:], logits_to_keep=1)
        assert (few.calls > before) == takes


def test_imposed_linear_route_installs_nothing(tiny_pair):
    pair = dataclasses.replace(tiny_pair, info={"few_rows_route": RouteChoice("linear", reason="imposed")})
    assert SmallRowsLinear.for_pair(pair) is None and not pair.info["few_rows_route"].measured
