from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dataset.manifest import CropBox, Dataset, DatasetItem
from dataset.preview import images_to_dataset, preview_page, split_captions
from dataset.save import save_dataset
from training.fs import resolve_inside


def _photo(path: Path, size=(300, 200), colour=(200, 30, 30)) -> str:
    Image.new("RGB", size, colour).save(path)
    return str(path)


@pytest.fixture
def cropped(tmp_path: Path) -> Dataset:
    src = tmp_path / "src"
    src.mkdir()
    a = _photo(src / "a.png")
    b = _photo(src / "b.jpg", (200, 300), (20, 40, 220))
    (src / "sub").mkdir()
    a2 = _photo(src / "sub" / "a.png", (128, 128), (0, 255, 0))
    return Dataset(
        (
            DatasetItem(a, "red", CropBox(50, 0, 200, 200), (128, 128), "centre", repeats=2),
            DatasetItem(b, "blue", CropBox(0, 50, 200, 250), (128, 160), "saliency"),
            DatasetItem(a2, "green", None, (64, 64), "none"),
        ),
        root=str(src),
    )


def test_save_writes_bucket_sized_images_captions_and_manifest(cropped: Dataset, tmp_path: Path) -> None:
    target = tmp_path / "out" / "set1"
    saved = save_dataset(cropped, target)
    names = sorted(p.name for p in target.iterdir())
    assert names == ["a.png", "a.txt", "a_2.png", "a_2.txt", "b.png", "b.txt", "dataset.jsonl"]
    assert Image.open(target / "a.png").size == (128, 128)
    assert Image.open(target / "b.png").size == (128, 160)
    assert Image.open(target / "a_2.png").getpixel((5, 5)) == (0, 255, 0)
    assert (target / "b.txt").read_text(encoding="utf-8") == "blue\n"
    back = Dataset.read_jsonl(target / "dataset.jsonl")
    assert back.items == saved.items
    assert [i.repeats for i in back.items] == [2, 1, 1]
    assert back.items[0].flags["original_crop"] == [50, 0, 200, 200]
    assert not any(p.name.startswith(".") for p in target.parent.iterdir())  # staging cleaned up


def test_existing_files_are_not_overwritten_unless_asked(cropped: Dataset, tmp_path: Path) -> None:
    target = tmp_path / "out"
    save_dataset(cropped, target)
    (target / "a.txt").write_text("hand edited\n")
    with pytest.raises(ValueError, match=r"already holds 7 of the files.*enable overwrite"):
        save_dataset(cropped, target)
    assert (target / "a.txt").read_text() == "hand edited\n"
    save_dataset(cropped, target, overwrite=True)
    assert (target / "a.txt").read_text() == "red\n"


def test_a_bad_source_leaves_no_partial_output(cropped: Dataset, tmp_path: Path) -> None:
    broken = Path(cropped.items[1].source)
    broken.write_bytes(broken.read_bytes()[:200])
    target = tmp_path / "out"
    with pytest.raises(ValueError, match=r"b\.jpg.*(?i:truncated)"):
        save_dataset(cropped, target)
    assert not target.exists()
    assert not any(p.name.startswith(".out") for p in tmp_path.iterdir())


@pytest.mark.parametrize("bad", ["../escape", "a/../../escape", "/etc/passwd", "..\\escape", "C:\\x"])
def test_paths_that_escape_the_output_folder_are_refused(tmp_path: Path, bad: str) -> None:
    with pytest.raises(ValueError, match="save folder"):
        resolve_inside(tmp_path, bad, "save folder")


def test_symlink_out_of_the_base_is_refused(tmp_path: Path) -> None:
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "link").symlink_to(tmp_path)
    assert resolve_inside(tmp_path / "base", "sets/one") == (tmp_path / "base" / "sets" / "one").resolve()
    with pytest.raises(ValueError, match="outside"):
        resolve_inside(tmp_path / "base", "link/x")


def test_preview_tiles_show_the_crop(cropped: Dataset) -> None:
    tiles = preview_page(cropped, start=0, count=2, tile=256)
    assert len(tiles) == 2 and {t.size for t in tiles} == {(256, 320)}
    arr = np.asarray(tiles[0]).astype(int)
    # the 300x200 red source fills the tile width; outside the crop (x < 50 source px) it is dimmed
    inside, outside = arr[128, 128], arr[128, 10]
    assert inside[0] > 150 and outside[0] < inside[0] * 0.6
    with pytest.raises(ValueError, match="outside the dataset's 3 item"):
        preview_page(cropped, start=3)


def test_images_to_dataset_round_trip(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 255, (40, 60, 3), dtype=np.uint8) for _ in range(2)]
    ds = images_to_dataset(arrays, split_captions("one caption", 2), tmp_path / "imgs")
    assert [i.caption for i in ds.items] == ["one caption", "one caption"]
    assert np.array_equal(np.asarray(Image.open(ds.items[1].source)), arrays[1])
    again = images_to_dataset(arrays, ["a", "b"], tmp_path / "imgs")
    assert [i.source for i in again.items] == [i.source for i in ds.items]  # content-named, reused
    with pytest.raises(ValueError, match="3 lines for 2 images"):
        split_captions("a\nb\nc", 2)


def test_a_saved_dataset_reloads_with_its_repeats(cropped: Dataset, tmp_path: Path) -> None:
    from dataset.folder import scan_folder

    target = tmp_path / "saved"
    save_dataset(cropped, target)
    reloaded = {Path(i.source).name: i for i in scan_folder(target).items}
    assert {name: item.repeats for name, item in reloaded.items()} == {"a.png": 2, "b.png": 1, "a_2.png": 1}
    assert reloaded["b.png"].caption == "blue"
    assert {i.repeats for i in scan_folder(target, repeats=5).items} == {5}
