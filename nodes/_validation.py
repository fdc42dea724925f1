"""How our nodes get their inputs checked by ComfyUI before a run.

ComfyUI checks each widget against its min/max and options and pins a failure on that one widget,
unless the node's ``validate_inputs`` names the input: then ComfyUI skips its own checks for that
input and pins whatever ``validate_inputs`` returns on every input it names. So each node's
``validate_inputs`` names only inputs that need a check ComfyUI cannot do (a path, a file that must
exist, a finite float, a rule between two inputs), calls the library check for them, and returns one
line per problem, each naming its input.

ComfyUI 0.3.75 does not check V3 combo values at all; 0.33 does. :class:`Choice` is a combo that
ComfyUI checks on both.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

from comfy_api.latest import io

# ComfyUI with schema-expanding inputs (DynamicCombo, 0.33) looks V3 input types up by value and checks V3
# combos itself; before that (0.3.75) it checks only combos declared V1-style, with the options as the type.
V1_COMBO_FORM = not hasattr(io, "DynamicCombo")


class Choice(io.Combo.Input):
    """A combo whose value ComfyUI itself checks against ``options``, naming the input and the allowed
    values ("Value not in list: background: 'purple' not in ['white', 'black', 'grey']"): declared with
    the options list as its type where ComfyUI checks only that form (see ``V1_COMBO_FORM``)."""

    def get_io_type(self):
        return list(self.options) if V1_COMBO_FORM else super().get_io_type()


def verdict(problems: Mapping[str, str] | Iterable[str]) -> bool | str:
    """``validate_inputs``'s answer: True, or one line per problem."""
    lines = list(problems.values() if isinstance(problems, Mapping) else problems)
    return "\n".join(lines) if lines else True


def range_problems(node: type[io.ComfyNode], **values: float | None) -> dict[str, str]:
    """ComfyUI's own checks for numbers that ``validate_inputs`` names (naming them switches those off): the
    min/max declared in ``node``'s schema, plus finiteness (ComfyUI's min/max let NaN through)."""
    declared = {i.id: i for i in node.define_schema().inputs}
    problems = {}
    for name, value in values.items():
        if value is None:  # linked from another node: checked when it runs
            continue
        low, high = getattr(declared[name], "min", None), getattr(declared[name], "max", None)
        if not math.isfinite(value):
            problems[name] = f"{name} must be a finite number, got {value!r}"
        elif (low is not None and value < low) or (high is not None and value > high):
            problems[name] = f"{name} must be between {low:g} and {high:g}, got {value!r}"
    return problems
