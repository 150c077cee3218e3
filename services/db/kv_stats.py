"""Which kv values are statistics: the one Python home of the rule.

A sample's kv JSON holds scalar statistics (KL, JS, entropies, step counts) beside lists (top-k token ids),
booleans, strings and nested per-step objects. The run aggregates average the scalar ones per run (the Python
reference in services.db.results; the SQL twin of this rule is `_KV_SUMS` in services.db.aggregates:
`jsonb_typeof(value) = 'number'` on Postgres, `json_each` type 'integer' / 'real' on SQLite, since JSON has no NaN
or infinities and booleans are their own JSON type), and the dashboard plots them per sample.
"""
from __future__ import annotations

import math
from typing import Any


def scalar_kv_stats(kv: Any) -> dict[str, float]:
    """The statistics of one kv value: finite int / float numbers at the top level of a kv object (booleans,
    strings, lists and nested objects are not statistics; a kv that is not an object has none)."""
    if not isinstance(kv, dict):
        return {}
    return {str(k): float(v) for k, v in kv.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
