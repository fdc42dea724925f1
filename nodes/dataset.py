"""Dataset nodes: load a folder, smart-crop into aspect buckets, preview, images -> dataset, save.

Thin wrappers over the ``dataset`` library; the manifest (``SD35_DATASET``) carries paths, crop
boxes, buckets and captions, never pixels.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import TYPE_CHECKING

import folder_paths
import numpy as np
import torch
from comfy_api.latest import io, ui

from ..dataset.buckets import SD35_BUCKETS_1024, format_buckets, parse_buckets, scale_buckets
from ..dataset.options import CAPTION_EXTENSIONS, MODES, TOO_SMALL
from ..training.fs import is_inside, resolve_inside
from ._progress import progress_callback
from ._types import CATEGORY
from ._types import Dataset as DatasetType
from ._validation import Choice

if TYPE_CHECKING:  # the libraries load on first use: ComfyUI imports every pack at start
    from ..dataset.manifest import Dataset

CATEGORY_DATASET = f"{CATEGORY}/dataset"
# Absolute dataset folders outside ComfyUI's input folder must be listed here (os.pathsep-separated).
ALLOWED_DIRS_ENV = "SD35_TUNER_DATASET_DIRS"
BACKGROUNDS = {"white": (255, 255, 255), "black": (0, 0, 0), "grey": (128, 128, 128)}
CAPTION_EXT_CHOICES = {".txt": (".txt",), ".caption": (".caption",), ".txt, then .caption": CAPTION_EXTENSIONS}


def extra_dataset_dirs() -> list[str]:
    return [p for p in os.environ.get(ALLOWED_DIRS_ENV, "").split(os.pathsep) if p.strip()]


def resolve_dataset_folder(folder: str) -> Path:
    """A folder under ComfyUI's input directory, or an absolute path inside a directory listed in
    the SD35_TUNER_DATASET_DIRS environment variable; ValueError otherwise."""
    input_dir = folder_paths.get_input_directory()
    if os.path.isabs(folder.strip()):
        if not is_inside(folder.strip(), [input_dir, *extra_dataset_dirs()]):
            raise ValueError(
                f"dataset folder '{folder}' is outside ComfyUI's input folder; give a path relative to {input_dir}, "
                f"or list its parent in the {ALLOWED_DIRS_ENV} environment variable before starting ComfyUI"
            )
        return Path(folder.strip()).resolve()
    return resolve_inside(input_dir, folder, "dataset folder")


def folder_fingerprint(root: Path) -> str:
    """Hash of every file's relative path, size and mtime, so edits on disk re-run the loader."""
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*")) if root.is_dir() else ():
        if path.is_file():
            st = path.stat()
            digest.update(f"{path.relative_to(root)}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def report(dataset: Dataset, headline: str) -> str:
    return "\n".join([headline, *dataset.notes])


class LoadDataset(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SD35TunerLoadDataset",
            display_name="Load Dataset Folder",
            category=CATEGORY_DATASET,
            description="Reads a folder of images (png, jpg, webp, bmp, tiff) and their .txt/.caption captions into "
            "a dataset manifest (paths and captions, no pixels). kohya 'N_name' subfolders set repeats. Unreadable "
            "files are skipped and listed in the report unless strict is on.",
            inputs=[
                io.Combo.Input(  # not a Choice: a typed path (API, saved workflow) is accepted and checked below
                    "folder",
                    options=folder_paths.get_input_subfolders(),
                    tooltip="A folder of images inside ComfyUI's input folder (press R to refresh the list after "
                    "adding one). A typed path relative to the input folder works too; absolute paths only inside a "
                    f"directory listed in the {ALLOWED_DIRS_ENV} environment variable.",
                ),
                io.Boolean.Input(
                    "recursive", default=True, tooltip="Include subfolders. Default on; off reads the top level only."
                ),
                io.Int.Input(
                    "repeats",
                    default=0,
                    min=0,
                    max=1000,
                    tooltip="Times each image is seen per epoch. Default 0: taken from a kohya 'N_name' folder "
                    "prefix, else 1. Any value above 0 overrides the folder prefixes.",
                ),
                Choice(
                    "caption_extension",
                    options=list(CAPTION_EXT_CHOICES),
                    default=".txt, then .caption",
                    tooltip="Sidecar caption files to read (default: name.txt, else name.caption).",
                ),
                io.Boolean.Input(
                    "strict",
                    default=False,
                    tooltip="Stop at the first unreadable image or caption without an image. Default off: they are "
                    "skipped and counted in the report.",
                ),
                Choice(
                    "background",
                    options=list(BACKGROUNDS),
                    default="white",
                    tooltip="Colour that transparent areas (PNG/WebP alpha) are filled with (default white).",
                ),
            ],
            outputs=[
                DatasetType.Output(
                    display_name="dataset", tooltip="The images and their captions (paths, no pixels)."
                ),
                io.Int.Output(display_name="count", tooltip="Number of images loaded."),
                io.String.Output(display_name="report", tooltip="What was loaded and what was skipped, and why."),
            ],
        )

    @classmethod
    def validate_inputs(cls, folder: str | None) -> bool | str:
        if folder is None:  # linked from another node: checked when it runs
            return True
        try:
            path = resolve_dataset_folder(folder)
        except ValueError as err:
            return str(err)
        if not path.is_dir():
            return f"folder: dataset folder '{folder}' not found ({path}); create it inside ComfyUI's input folder"
        return True

    @classmethod
    def fingerprint_inputs(cls, folder: str, **_: object) -> str:
        try:
            return folder_fingerprint(resolve_dataset_folder(folder))
        except ValueError:
            return ""

    @classmethod
    def execute(
        cls, folder: str, recursive: bool, repeats: int, caption_extension: str, strict: bool, background: str
    ) -> io.NodeOutput:
        from ..dataset.folder import scan_folder

        root = resolve_dataset_folder(folder)
        dataset = scan_folder(
            root,
            recursive=recursive,
            repeats=repeats,
            caption_exts=CAPTION_EXT_CHOICES[caption_extension],
            strict=strict,
            background=BACKGROUNDS[background],
            progress=progress_callback(),
            allowed=[folder_paths.get_input_directory(), folder_paths.get_output_directory(), *extra_dataset_dirs()],
        )
        text = report(dataset, f"{len(dataset)} image(s) from {root}")
        return io.NodeOutput(dataset, len(dataset), text, ui={"text": [text]})


class SmartCrop(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SD35TunerSmartCrop",
            display_name="Smart Crop to Buckets",
            category=CATEGORY_DATASET,
            description="Gives every image the aspect bucket closest to its shape and the largest crop of exactly "
            "that aspect, placed on the faces (OpenCV Haar detector, with headroom) or else on the most salient "
            "region (spectral residual). Records the box and the reason; never writes to the source folder.",
            inputs=[
                DatasetType.Input("dataset"),
                Choice(
                    "mode",
                    options=list(MODES),
                    default="face_then_saliency",
                    tooltip="face_then_saliency (default): faces if found, else saliency. saliency: ignore faces. "
                    "centre: centred crop. none: no crop, the whole image is resized to its bucket (may stretch).",
                ),
                io.Int.Input(
                    "resolution",
                    default=1024,
                    min=128,
                    max=2048,
                    step=64,
                    tooltip="Scales the buckets: 1024 (default) gives the SD3.5 1-megapixel set, 512 a quarter of it "
                    "(128: the built-in demo model's size). Sides stay multiples of 64.",
                ),
                io.String.Input(
                    "buckets",
                    default="",
                    multiline=True,
                    tooltip="Custom buckets at resolution 1024, e.g. '1024x1024, 1216x832' (scaled like the "
                    f"defaults). Empty (default) uses the SD3.5 set: {format_buckets(SD35_BUCKETS_1024)}.",
                ),
                io.Float.Input(
                    "headroom",
                    default=0.5,
                    min=0.0,
                    max=3.0,
                    step=0.05,
                    tooltip="Margin kept around each face, as a fraction of the face size on every side. Default 0.5; "
                    "0 only keeps the face box itself inside the crop.",
                ),
                io.Float.Input(
                    "max_upscale",
                    default=1.5,
                    min=0.0,
                    max=8.0,
                    step=0.05,
                    tooltip="Largest enlargement allowed from crop to bucket. Default 1.5; 1 forbids upscaling; "
                    "0 disables the check.",
                ),
                Choice(
                    "too_small",
                    options=list(TOO_SMALL),
                    default="skip",
                    tooltip="Images over the upscale limit: skip (default, listed in the report), keep (flagged), "
                    "or error (stop the run).",
                ),
            ],
            outputs=[
                DatasetType.Output(
                    display_name="dataset", tooltip="The dataset with a bucket and crop box per image."
                ),
                io.String.Output(display_name="report", tooltip="Counts per crop reason, skipped images, warnings."),
            ],
        )

    @classmethod
    def validate_inputs(cls, buckets: str | None) -> bool | str:
        try:
            _ = buckets and buckets.strip() and parse_buckets(buckets)
        except ValueError as err:
            return str(err)
        return True

    @classmethod
    def execute(
        cls,
        dataset: Dataset,
        mode: str,
        resolution: int,
        buckets: str,
        headroom: float,
        max_upscale: float,
        too_small: str,
    ) -> io.NodeOutput:
        from ..dataset.crop import CropSettings, crop_dataset
        from ..dataset.faces import haar_face_detector

        base = parse_buckets(buckets) if buckets.strip() else SD35_BUCKETS_1024
        settings = CropSettings(mode=mode, headroom=headroom, max_upscale=max_upscale, too_small=too_small)
        detector, why = haar_face_detector() if mode == "face_then_saliency" else (None, "")
        out = crop_dataset(
            dataset,
            scale_buckets(resolution, base),
            settings,
            detector=detector,
            detector_missing=why,
            progress=progress_callback(len(dataset)),
        )
        reasons = [i.crop_reason for i in out.items]
        counts = ", ".join(f"{r}: {reasons.count(r)}" for r in ("face", "saliency", "centre", "none"))
        text = report(out, f"{len(out)} of {len(dataset)} image(s) cropped ({counts})")
        return io.NodeOutput(out, text, ui={"text": [text]})


class PreviewDataset(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SD35TunerPreviewDataset",
            display_name="Preview Dataset",
            category=CATEGORY_DATASET,
            description="Shows a page of the dataset as an IMAGE batch: each source image with its crop box "
            "(green face, orange saliency, blue centre), bucket, repeats and caption, to check before training.",
            is_output_node=True,
            inputs=[
                DatasetType.Input("dataset"),
                io.Int.Input("start", default=0, min=0, max=1_000_000, tooltip="First item shown (default 0)."),
                io.Int.Input("count", default=16, min=1, max=256, tooltip="Items per page (default 16)."),
                io.Int.Input(
                    "tile", default=512, min=128, max=2048, step=64, tooltip="Tile width in px (default 512)."
                ),
            ],
            outputs=[io.Image.Output(display_name="preview", tooltip="The page of tiles as an IMAGE batch.")],
        )

    @classmethod
    def execute(cls, dataset: Dataset, start: int, count: int, tile: int) -> io.NodeOutput:
        from ..dataset.preview import preview_page

        tiles = preview_page(dataset, start, count, tile)
        batch = torch.from_numpy(np.stack([np.asarray(t, dtype=np.float32) / 255.0 for t in tiles]))
        return io.NodeOutput(batch, ui=ui.PreviewImage(batch, cls=cls))


class ImagesToDataset(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SD35TunerImagesToDataset",
            display_name="Images to Dataset",
            category=CATEGORY_DATASET,
            description="Turns any IMAGE batch (from any node pack) plus captions into a dataset. The images are "
            "stored as PNGs in ComfyUI's temp folder, named by content.",
            inputs=[
                io.Image.Input("images"),
                io.String.Input(
                    "captions",
                    default="",
                    multiline=True,
                    tooltip="One caption per line, one line per image; a single line applies to every image. "
                    "Empty (default): no captions.",
                ),
            ],
            outputs=[
                DatasetType.Output(display_name="dataset", tooltip="The images as a dataset, with the captions.")
            ],
        )

    @classmethod
    def execute(cls, images: torch.Tensor, captions: str) -> io.NodeOutput:
        arrays = [np.clip(np.rint(i.cpu().numpy() * 255), 0, 255).astype(np.uint8)[..., :3] for i in images]
        folder = Path(folder_paths.get_temp_directory()) / "sd35_tuner_images"
        from ..dataset.preview import images_to_dataset, split_captions

        return io.NodeOutput(images_to_dataset(arrays, split_captions(captions, len(arrays)), folder))
