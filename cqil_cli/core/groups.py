"""Manual groupings (`--groups 14-15,16-17`), parsed without torch so that a bad one is
refused before any model loads."""

from __future__ import annotations

import re

_RANGE = re.compile(r"^\s*(\d+)\s*(?:-\s*(\d+))?\s*$")


def parse_group_spec(spec: str, num_layers: int) -> list[list[int]]:
    """Parse a manual grouping into the ordered list of steps.

    SPEC is `none` (no groups) or comma-separated inclusive ranges such as `14-15,16-17`; a
    bare number is a group of one. Layers not listed stay single steps.
    """
    text = str(spec).strip()
    if text.lower() in ("", "none"):
        return [[i] for i in range(num_layers)]
    owner: dict[int, str] = {}
    groups: list[list[int]] = []
    for part in text.split(","):
        match = _RANGE.match(part)
        if not match:
            raise ValueError(f"bad group '{part.strip()}' in '{spec}': expected START-END (e.g. 14-15) or a layer number")
        lo = int(match.group(1))
        hi = int(match.group(2)) if match.group(2) is not None else lo
        if hi < lo:
            raise ValueError(f"bad group '{part.strip()}': end layer {hi} is before start layer {lo}")
        if hi >= num_layers:
            raise ValueError(f"group '{part.strip()}' is out of range: the model has layers 0..{num_layers - 1}")
        for i in range(lo, hi + 1):
            if i in owner:
                raise ValueError(f"groups '{owner[i]}' and '{part.strip()}' overlap at layer {i}")
            owner[i] = part.strip()
        groups.append(list(range(lo, hi + 1)))
    steps: list[list[int]] = []
    starts = {g[0]: g for g in groups}
    i = 0
    while i < num_layers:
        step = starts.get(i, [i])
        steps.append(step)
        i = step[-1] + 1
    return steps
