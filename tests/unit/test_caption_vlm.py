from __future__ import annotations

import json
import weakref
from pathlib import Path

import pytest
from PIL import Image

import dataset.captioner as captioner_mod
from dataset.captioner import caption_images, find_captioner, list_captioners
from tools.sample_data import photo, write_tiny_captioners


@pytest.fixture(scope="module")
def captioners(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return write_tiny_captioners(tmp_path_factory.mktemp("captioners"))


@pytest.fixture(scope="module")
def photos() -> list[Image.Image]:
    return [Image.fromarray(photo(n)) for n in ("astronaut", "coffee", "rocket")]


class Recording(captioner_mod.Captioner):
    """The real captioner, remembering a weak reference to each model it loaded."""

    models: list[weakref.ref] = []

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        Recording.models.append(weakref.ref(self.model))


@pytest.fixture
def recording(monkeypatch: pytest.MonkeyPatch) -> type[Recording]:
    Recording.models = []
    monkeypatch.setattr(captioner_mod, "Captioner", Recording)
    return Recording


def test_captioners_folder_is_listed_and_missing_names_are_explained(captioners: dict[str, Path]) -> None:
    root = captioners["blip"].parent
    assert list_captioners([root, root / "missing"]) == ["tiny-blip", "tiny-florence2", "tiny-llava"]
    assert find_captioner("tiny-llava", [root]) == captioners["llava"]
    with pytest.raises(
        ValueError, match=r"captioner 'joycaption' not found: no joycaption/config.json in .*captioners"
    ):
        find_captioner("joycaption", [root])
    with pytest.raises(ValueError, match="must be a folder name"):
        find_captioner("../tiny-blip", [root])


@pytest.mark.parametrize("family", ["blip", "llava", "florence2"])
def test_batched_captions_from_two_model_families_then_unloaded(
    captioners: dict[str, Path], photos: list[Image.Image], recording: type[Recording], family: str
) -> None:
    seen: list[tuple[int, int]] = []
    texts = caption_images(
        captioners[family],
        photos,
        lambda im: im,
        batch_size=2,
        max_new_tokens=6,
        progress=lambda done, total: seen.append((done, total)),
    )
    assert len(texts) == 3 and all(isinstance(t, str) and t.strip() for t in texts)
    assert seen == [(2, 3), (3, 3)]
    assert len(recording.models) == 1 and recording.models[0]() is None  # the model was freed
    one_by_one = caption_images(captioners[family], photos, lambda im: im, batch_size=1, max_new_tokens=6)
    assert one_by_one == texts  # batching does not change what greedy decoding produces


def test_cancel_from_the_progress_callback_still_unloads(
    captioners: dict[str, Path], photos: list[Image.Image], recording: type[Recording]
) -> None:
    def cancel(done: int, total: int) -> None:
        raise InterruptedError("cancelled by the user")

    with pytest.raises(InterruptedError):
        caption_images(captioners["llava"], photos, lambda im: im, batch_size=1, max_new_tokens=4, progress=cancel)
    assert recording.models[0]() is None


def test_remote_code_is_refused_unless_allowed_and_never_run(tmp_path: Path) -> None:
    folder = tmp_path / "remote-vlm"
    folder.mkdir()
    (folder / "config.json").write_text(
        json.dumps({"model_type": "sd35_remote_vlm", "auto_map": {"AutoConfig": "configuration_remote.RemoteConfig"}})
    )
    marker = tmp_path / "ran"
    (folder / "configuration_remote.py").write_text(f"open({str(marker)!r}, 'w').write('x')\n")
    with pytest.raises(ValueError, match="trust_remote_code"):
        caption_images(folder, [Image.new("RGB", (8, 8))], lambda im: im)
    assert not marker.exists()


def test_batch_size_must_be_positive(captioners: dict[str, Path]) -> None:
    with pytest.raises(ValueError, match="batch_size"):
        caption_images(captioners["blip"], [], lambda im: im, batch_size=0)
