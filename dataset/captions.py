"""Caption templating: trigger word, prefix, suffix, ``{caption}``/``{trigger}`` template,
find/replace, and the policy that decides whether a new caption replaces an existing one.

All pure string functions, so the exact results are unit-tested. Adding the trigger or prefix
is idempotent (a caption that already starts with it is left alone), so running the node twice
does not stack ``sks, sks, ...``. Caption dropout and token shuffling are training-time options
and are deliberately not applied here: captions are stored whole.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .manifest import Dataset
from .options import POLICIES


@dataclass(frozen=True)
class CaptionTemplate:
    """``policy`` decides how a generated caption meets an existing one: "fill_missing" uses it
    only where there is no caption, "overwrite" replaces every caption, "prepend" puts it in
    front of the existing caption. Without a generated caption the existing one is kept."""

    trigger: str = ""
    prefix: str = ""
    suffix: str = ""
    template: str = ""  # e.g. "a photo of {trigger}, {caption}"; empty = "{caption}"
    find: str = ""
    replace: str = ""
    policy: str = "fill_missing"

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"caption policy '{self.policy}' is not one of {', '.join(POLICIES)}")


def _join(*parts: str) -> str:
    return ", ".join(p for p in (p.strip().strip(",").strip() for p in parts) if p)


def _tidy(text: str) -> str:
    text = re.sub(r"\s+", " ", text)
    text = re.sub(r"\s*,(\s*,)+", ",", text)  # ", ," left by empty placeholders
    text = re.sub(r"\s+,", ",", text)
    return text.strip().strip(",").strip()


def choose_caption(existing: str, generated: str | None, policy: str) -> str:
    """The base caption before templating, per ``policy`` (see CaptionTemplate)."""
    existing = existing.strip()
    if generated is None or not generated.strip():
        return existing
    generated = generated.strip()
    if policy == "overwrite" or not existing:
        return generated
    if policy == "prepend":
        return _join(generated, existing)
    return existing


def _starts_with(text: str, head: str) -> bool:
    return text.lower() == head.lower() or text.lower().startswith(head.lower().rstrip(",") + ",")


def _matches_template(text: str, template: str, trigger: str) -> bool:
    """Whether ``text`` is already an output of ``template`` (so applying it again would stack)."""
    parts = re.split(r"(\{caption\}|\{trigger\})", _tidy(template))
    pattern = "".join(
        ".*" if p == "{caption}" else re.escape(trigger) if p == "{trigger}" else re.escape(p) for p in parts
    )
    return re.fullmatch(pattern, text, flags=re.IGNORECASE | re.DOTALL) is not None


def format_caption(base: str, t: CaptionTemplate) -> str:
    """Apply find/replace, the template, then trigger + prefix and suffix; none of them twice."""
    body = base.replace(t.find, t.replace) if t.find else base
    trigger = t.trigger.strip()
    if t.template:
        uses_trigger = "{trigger}" in t.template
        if "{caption}" not in t.template and not uses_trigger:
            raise ValueError(f"caption template '{t.template}' has neither {{caption}} nor {{trigger}}")
        if not _matches_template(body, t.template, trigger):
            body = _tidy(t.template.replace("{caption}", body).replace("{trigger}", trigger))
        if uses_trigger:
            trigger = ""
    heads = [h for h in (trigger, t.prefix.strip()) if h]
    if heads and not _starts_with(body, _join(*heads)):
        for head in reversed(heads):
            if not _starts_with(body, head):
                body = _join(head, body)
    suffix = t.suffix.strip()
    if suffix and not body.lower().endswith(suffix.lower()):
        body = _join(body, suffix)
    return _tidy(body)


def apply_captions(dataset: Dataset, template: CaptionTemplate, generated: list[str] | None = None) -> Dataset:
    """A new manifest with every caption chosen per the policy and formatted by the template."""
    if generated is not None and len(generated) != len(dataset.items):
        raise ValueError(f"{len(generated)} generated captions for {len(dataset.items)} items")
    items = []
    for i, item in enumerate(dataset.items):
        base = choose_caption(item.caption, generated[i] if generated is not None else None, template.policy)
        flags = {k: v for k, v in item.flags.items() if k != "no_caption"}
        items.append(item.with_(caption=format_caption(base, template), flags=flags))
    return dataset.with_items(items)
