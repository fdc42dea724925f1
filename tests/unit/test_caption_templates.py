from __future__ import annotations

import pytest

from dataset.captions import CaptionTemplate, apply_captions, choose_caption, format_caption
from dataset.manifest import Dataset, DatasetItem

T = CaptionTemplate


@pytest.mark.parametrize(
    ("base", "template", "expected"),
    [
        ("a cat on a sofa", T(), "a cat on a sofa"),
        ("a cat on a sofa", T(trigger="sks"), "sks, a cat on a sofa"),
        ("a cat", T(trigger="sks", prefix="photo"), "sks, photo, a cat"),
        ("a cat", T(suffix="high quality"), "a cat, high quality"),
        ("a cat", T(trigger="sks", prefix="photo", suffix="film grain"), "sks, photo, a cat, film grain"),
        ("a cat", T(trigger="sks", template="a photo of {trigger}, {caption}"), "a photo of sks, a cat"),
        ("a cat", T(template="{caption}, in the style of sks"), "a cat, in the style of sks"),
        ("", T(trigger="sks", template="a photo of {trigger}, {caption}"), "a photo of sks"),
        ("", T(trigger="sks", prefix="photo"), "sks, photo"),
        ("a dog on grass with a dog", T(find="dog", replace="corgi"), "a corgi on grass with a corgi"),
        ("a dog", T(trigger="sks", find="dog", replace="corgi"), "sks, a corgi"),
        ("  a   cat ,  ", T(), "a cat"),
    ],
)
def test_format_caption_exact_strings(base: str, template: CaptionTemplate, expected: str) -> None:
    assert format_caption(base, template) == expected


@pytest.mark.parametrize(
    "template",
    [
        T(trigger="sks", prefix="photo", suffix="film grain"),
        T(trigger="sks", template="a photo of {trigger}, {caption}"),
        T(prefix="photo"),
    ],
)
def test_formatting_twice_changes_nothing(template: CaptionTemplate) -> None:
    once = format_caption("a cat on a sofa", template)
    assert format_caption(once, template) == once


@pytest.mark.parametrize(
    ("existing", "generated", "policy", "expected"),
    [
        ("old", "new", "fill_missing", "old"),
        ("", "new", "fill_missing", "new"),
        ("old", "new", "overwrite", "new"),
        ("", "new", "overwrite", "new"),
        ("old", "new", "prepend", "new, old"),
        ("", "new", "prepend", "new"),
        ("old", None, "overwrite", "old"),
        ("old", "  ", "overwrite", "old"),
    ],
)
def test_policies(existing: str, generated: str | None, policy: str, expected: str) -> None:
    assert choose_caption(existing, generated, policy) == expected


def test_apply_captions_to_a_dataset() -> None:
    ds = Dataset(
        (
            DatasetItem("/a.png", caption="a cat", flags={"size": [1, 1]}),
            DatasetItem("/b.png", caption="", flags={"no_caption": True}),
        )
    )
    out = apply_captions(ds, T(trigger="sks"), generated=["ignored", "a dog"])
    assert [i.caption for i in out.items] == ["sks, a cat", "sks, a dog"]
    assert out.items[1].flags == {}
    assert [i.caption for i in apply_captions(ds, T(trigger="sks")).items] == ["sks, a cat", "sks"]
    overwrite = apply_captions(ds, T(policy="overwrite"), generated=["x", "y"])
    assert [i.caption for i in overwrite.items] == ["x", "y"]


def test_bad_template_and_policy_are_named() -> None:
    with pytest.raises(ValueError, match="policy 'replace'"):
        T(policy="replace")
    with pytest.raises(ValueError, match=r"template 'photo of'"):
        format_caption("a cat", T(template="photo of"))
    with pytest.raises(ValueError, match="2 generated captions for 1 items"):
        apply_captions(Dataset((DatasetItem("/a.png"),)), T(), ["a", "b"])
