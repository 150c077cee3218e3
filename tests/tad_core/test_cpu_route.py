"""The few-rows CPU route is chosen by a measurement on the pair's own layers, recorded, and can be imposed."""
from __future__ import annotations

import dataclasses

from tad_core.cpu_route import MARGIN, RouteChoice, measure
from tad_core.engine import SmallRowsLinear
from tad_core.models import load_pair


def test_route_follows_the_measurement_and_is_recorded(tiny_model_dir, tiny_lora_dir):
    pair = load_pair(str(tiny_model_dir), adapter=tiny_lora_dir)
    choice = measure(pair.model)
    assert choice.linear_ms > 0 and choice.mm_ms > 0
    assert choice.route == ("mm" if choice.mm_ms < MARGIN * choice.linear_ms else "linear")
    assert "measured on this CPU" in choice.describe()
    few = SmallRowsLinear.for_pair(pair)
    recorded = pair.info["few_rows_route"]
    assert isinstance(recorded, RouteChoice) and recorded.linear_ms is not None
    assert (few is not None) == (recorded.route == "mm")  # the wrapper exists exactly when the route won
    assert SmallRowsLinear.for_pair(pair) is few  # measured once per pair


def test_imposed_linear_route_installs_nothing(tiny_pair):
    pair = dataclasses.replace(tiny_pair, info={"few_rows_route": RouteChoice("linear", reason="imposed")})
    assert SmallRowsLinear.for_pair(pair) is None and pair.info["few_rows_route"].linear_ms is None
