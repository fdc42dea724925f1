from __future__ import annotations

from pathlib import Path

import pytest

from dataset.folder import read_caption, scan_folder
from dataset.manifest import Dataset
from tools.sample_data import SAMPLES, write_bad_inputs, write_sample_folder


@pytest.fixture(scope="module")
def sample(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_sample_folder(tmp_path_factory.mktemp("sample") / "photos")


def test_sample_folder_loads_with_captions_sizes_and_kohya_repeats(sample: Path) -> None:
    ds = scan_folder(sample)
    by_name = {Path(i.source).name: i for i in ds.items}
    assert sorted(by_name) == sorted(Path(rel).name for rel, _, _ in SAMPLES)
    assert by_name["chelsea.png"].repeats == 2  # from the 2_cats folder
    assert by_name["coffee.jpg"].repeats == 1
    assert by_name["coffee.jpg"].caption == "a cup of coffee on a saucer"
    assert by_name["coffee.jpg"].flags["size"] == [600, 400]
    assert ds.notes == ()


def test_explicit_repeats_override_and_no_recursion(sample: Path) -> None:
    ds = scan_folder(sample, recursive=False, repeats=3)
    assert "chelsea.png" not in {Path(i.source).name for i in ds.items}
    assert {i.repeats for i in ds.items} == {3}


def test_bad_files_are_skipped_and_counted(tmp_path: Path) -> None:
    bad = write_bad_inputs(tmp_path)
    ds = scan_folder(tmp_path)
    names = {Path(i.source).name for i in ds.items}
    assert names == {"cmyk.jpg", "gray16.png", "rgba.png", "palette.png", "rotated.jpg", "good.jpg", "latin.jpg"}
    assert ds.notes[0] == "4 of 11 image file(s) skipped as unreadable"
    joined = "\n".join(ds.notes)
    for kind in ("zero_byte", "truncated_jpeg", "text_as_png", "bomb", "orphan_caption"):
        assert str(bad[kind]) in joined


def test_strict_mode_stops_at_the_first_bad_file(tmp_path: Path) -> None:
    bad = write_bad_inputs(tmp_path)
    with pytest.raises(ValueError, match="strict mode") as info:
        scan_folder(tmp_path, strict=True)
    assert str(bad["orphan_caption"]) in str(info.value)
    bad["orphan_caption"].unlink()
    with pytest.raises(ValueError, match="bomb.png.*too large"):
        scan_folder(tmp_path, strict=True)


def test_captions_in_utf16_and_latin1_are_decoded(tmp_path: Path) -> None:
    bad = write_bad_inputs(tmp_path)
    assert read_caption(bad["caption_utf16"]) == "café, naïve — ünïcode"
    assert read_caption(bad["caption_latin1"]) == "café crème"
    bomless = tmp_path / "x.txt"
    bomless.write_bytes("a cat".encode("utf-16-le"))
    assert read_caption(bomless) == "a cat"


def test_empty_or_missing_folder_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="has no usable image"):
        scan_folder(tmp_path)
    with pytest.raises(ValueError, match="does not exist"):
        scan_folder(tmp_path / "nope")
    (tmp_path / "zero.png").write_bytes(b"")
    with pytest.raises(ValueError, match="1 bad file.*zero.png"):
        scan_folder(tmp_path)


def test_manifest_round_trips_through_jsonl(sample: Path, tmp_path: Path) -> None:
    ds = scan_folder(sample)
    ds.write_jsonl(tmp_path / "dataset.jsonl")
    back = Dataset.read_jsonl(tmp_path / "dataset.jsonl")
    assert back.items == ds.items


def test_the_chosen_background_travels_with_the_items(tmp_path: Path) -> None:
    from dataset.images import render_item

    bad = write_bad_inputs(tmp_path)
    ds = scan_folder(tmp_path, background=(0, 0, 255))
    item = next(i for i in ds.items if i.source == str(bad["rgba"].resolve()))
    assert item.flags["background"] == [0, 0, 255]
    rendered = render_item(item)
    assert rendered.getpixel((5, 5)) == (255, 0, 0) and rendered.getpixel((55, 5)) == (0, 0, 255)
    default = next(i for i in scan_folder(tmp_path).items if i.source == item.source)
    assert "background" not in default.flags and render_item(default).getpixel((55, 5)) == (255, 255, 255)


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_links_leading_outside_the_allowed_folders_are_skipped_naming_them(sample: Path, tmp_path: Path) -> None:
    """A planted file link to a photo (or a caption) outside the dataset folder is never read or copied."""
    photo = (sample / "coffee.jpg").read_bytes()
    outside = tmp_path / "private"
    outside.mkdir()
    (outside / "secret.png").write_bytes(photo)
    (outside / "secret.txt").write_text("private caption")
    root = tmp_path / "input" / "set"
    (root / ".store").mkdir(parents=True)
    (root / "good.jpg").write_bytes(photo)
    (root / "link.png").symlink_to(outside / "secret.png")
    (root / "cap.jpg").write_bytes(photo)
    (root / "cap.txt").symlink_to(outside / "secret.txt")  # the caption of a good image leads out
    (root / ".store" / "real.jpg").write_bytes(photo)
    (root / "inner.jpg").symlink_to(root / ".store" / "real.jpg")  # stays inside: followed
    before = _tree(outside)
    ds = scan_folder(root)
    assert sorted(Path(i.source).name for i in ds.items) == ["good.jpg", "real.jpg"]
    notes = "\n".join(ds.notes)
    assert f"{root / 'link.png'}: a link to {outside / 'secret.png'}, outside the allowed folders" in notes
    assert f"{root / 'cap.txt'}: a link to {outside / 'secret.txt'}, outside the allowed folders" in notes
    assert all("private caption" not in i.caption for i in ds.items)
    with pytest.raises(ValueError, match=r"cap.txt: a link to .*secret.txt, outside the allowed folders.*strict"):
        scan_folder(root, strict=True)
    allowed = scan_folder(root, allowed=[tmp_path])  # the node passes ComfyUI's input and output folders
    assert sorted(Path(i.source).name for i in allowed.items) == ["cap.jpg", "good.jpg", "real.jpg", "secret.png"]
    assert _tree(outside) == before


def test_a_linked_manifest_outside_the_folder_is_ignored(sample: Path, tmp_path: Path) -> None:
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    Dataset((), root=str(outside)).write_jsonl(outside / "dataset.jsonl")
    root = tmp_path / "set"
    root.mkdir()
    (root / "a.jpg").write_bytes((sample / "coffee.jpg").read_bytes())
    (root / "dataset.jsonl").symlink_to(outside / "dataset.jsonl")
    assert [i.repeats for i in scan_folder(root).items] == [1]
