"""Small folders of real photographs (from scikit-image's bundled ``skimage.data``) for tests and demos.

``write_sample_folder`` writes a kohya-style dataset folder: photos with sidecar ``.txt``
captions, one ``N_name`` repeats subfolder, no downloads. ``write_bad_inputs`` writes one file
per kind of broken or awkward input the dataset loader must handle.

The demo world: ``PRETRAIN_PHOTOS`` are the pictures the built-in demo base model learns at setup,
each with a plain caption; ``subject_photos`` are crops of one subject it never sees (the red
motorcycle of scikit-image's stereo pair), which the main job teaches it with a LoRA.
"""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

# (file name, skimage.data function, caption). astronaut() and camera() show a human face.
SAMPLES = (
    ("astronaut.png", "astronaut", "an astronaut in a white suit in front of the American flag"),
    ("coffee.jpg", "coffee", "a cup of coffee on a saucer"),
    ("rocket.jpg", "rocket", "a rocket on its launch pad"),
    ("2_cats/chelsea.png", "chelsea", "a tabby cat looking to the side"),
    ("camera.png", "camera", "a man with a camera on a tripod"),
)


# (skimage.data name, caption): what the demo base model is pretrained on (tools/demo_base.py).
PRETRAIN_PHOTOS = (
    ("astronaut", "a photo of an astronaut"),
    ("chelsea", "a photo of a cat"),
    ("coffee", "a cup of coffee"),
    ("rocket", "a rocket on its launch pad at night"),
    ("hubble_deep_field", "galaxies in deep space"),
    ("retina", "a photo of a retina"),
    ("immunohistochemistry", "cells under a microscope"),
    ("camera", "a black and white photo of a man with a camera"),
)

# The held-out subject: never in pretraining; the main job's LoRA learns it.
SUBJECT_CAPTION = "a red motorcycle in a garage"
# (stereo view, left edge of a 500 x 500 crop): the two views of the stereo pair, aligned on the motorcycle
# (the left view's picture sits 48 px further right), and the same pair framed 32 px to the left
_SUBJECT_CROPS = (("left", 168), ("right", 120), ("left", 136), ("right", 88))


def photo(name: str) -> np.ndarray:
    """An RGB uint8 array of one of scikit-image's bundled photos."""
    import skimage.data

    arr = getattr(skimage.data, name)()
    if arr.ndim == 2:
        arr = np.stack([arr] * 3, axis=-1)
    return np.ascontiguousarray(arr[..., :3])


def square(arr: np.ndarray, size: int) -> np.ndarray:
    """The centred square of ``arr``, area-resized to ``size`` x ``size`` (RGB uint8)."""
    h, w = arr.shape[:2]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    crop = Image.fromarray(np.ascontiguousarray(arr[top : top + side, left : left + side, :3]))
    return np.asarray(crop.resize((size, size), Image.Resampling.BOX))


def subject_photos() -> list[np.ndarray]:
    """Four 500 x 500 views of the held-out subject (RGB uint8): two framings of both stereo views."""
    import skimage.data

    views = dict(zip(("left", "right"), skimage.data.stereo_motorcycle()[:2], strict=True))
    return [np.ascontiguousarray(views[view][:, left : left + 500]) for view, left in _SUBJECT_CROPS]


def write_subject_folder(dest: Path) -> Path:
    """Write the held-out subject's views as PNGs with ``SUBJECT_CAPTION`` sidecars under ``dest``; return it."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    for i, arr in enumerate(subject_photos()):
        Image.fromarray(arr).save(dest / f"motorcycle_{i}.png")
        (dest / f"motorcycle_{i}.txt").write_text(SUBJECT_CAPTION + "\n", encoding="utf-8")
    return dest


def write_sample_folder(dest: Path) -> Path:
    """Write the sample photos with their captions under ``dest`` (created); return ``dest``."""
    dest = Path(dest)
    for rel, fn, caption in SAMPLES:
        path = dest / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        arr = photo(fn)
        im = Image.fromarray(arr) if fn != "camera" else Image.fromarray(arr[..., 0], "L")
        im.save(path, quality=95) if path.suffix == ".jpg" else im.save(path)
        path.with_suffix(".txt").write_text(caption + "\n", encoding="utf-8")
    return dest


def _png_with_size(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` (pixel data is a 1x1 stub, never decoded)."""
    buf = io.BytesIO()
    Image.new("L", (1, 1)).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    ihdr = data.index(b"IHDR")
    data[ihdr + 4 : ihdr + 12] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[ihdr : ihdr + 17])) & 0xFFFFFFFF
    data[ihdr + 17 : ihdr + 21] = struct.pack(">I", crc)
    return bytes(data)


def _jpeg_with_orientation(arr: np.ndarray, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", exif=exif.tobytes(), quality=95)
    return buf.getvalue()


def write_bad_inputs(dest: Path) -> dict[str, Path]:
    """Write one file per awkward input kind under ``dest``; return {kind: path}."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    coffee = photo("coffee")[::4, ::4]  # 100 x 150, small and fast
    out: dict[str, Path] = {}

    def put(kind: str, name: str, data: bytes) -> None:
        out[kind] = dest / name
        out[kind].write_bytes(data)

    def encode(im: Image.Image, fmt: str, **kw: object) -> bytes:
        buf = io.BytesIO()
        im.save(buf, fmt, **kw)
        return buf.getvalue()

    jpeg = encode(Image.fromarray(coffee), "JPEG", quality=90)
    put("zero_byte", "zero.png", b"")
    put("truncated_jpeg", "truncated.jpg", jpeg[: len(jpeg) // 2])
    put("text_as_png", "notes.png", b"this is a text file, not a picture\n")
    put("cmyk_jpeg", "cmyk.jpg", encode(Image.fromarray(coffee).convert("CMYK"), "JPEG", quality=90))
    gray16 = (np.linspace(0, 65535, 64 * 48).reshape(48, 64)).astype(np.uint16)
    put("png16", "gray16.png", encode(Image.fromarray(gray16), "PNG"))
    rgba = np.zeros((40, 60, 4), np.uint8)
    rgba[..., 0] = 255  # red, left half opaque, right half fully transparent
    rgba[:, :30, 3] = 255
    put("rgba", "rgba.png", encode(Image.fromarray(rgba, "RGBA"), "PNG"))
    put("palette", "palette.png", encode(Image.fromarray(coffee).convert("P", palette=Image.Palette.ADAPTIVE), "PNG"))
    put("bomb", "bomb.png", _png_with_size(20_000, 20_000))
    put("exif_rotated", "rotated.jpg", _jpeg_with_orientation(coffee, 6))
    put("good", "good.jpg", jpeg)
    put("caption_utf16", "good.txt", "café, naïve — ünïcode".encode("utf-16"))
    put("latin1_image", "latin.jpg", jpeg)
    put("caption_latin1", "latin.txt", "café crème".encode("latin-1"))
    put("orphan_caption", "orphan.txt", b"a caption with no image")
    return out


_WORDS = (
    "a an the photo picture of cat dog man woman astronaut rocket coffee cup flag suit white red blue "
    "on in with and at sky ground table camera tripod sitting standing looking side front small large"
).split()


def _word_tokenizer(specials: dict[str, str], extra: tuple[str, ...] = ()):
    """A whitespace word-level fast tokenizer over a fixed tiny vocabulary (no download)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate([*dict.fromkeys([*specials.values(), *extra, *_WORDS])])}
    core = Tokenizer(models.WordLevel(vocab, unk_token=specials["unk_token"]))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=core, **specials), len(vocab)


def _tiny_blip(dest: Path) -> None:
    import torch
    from transformers import BlipConfig, BlipForConditionalGeneration, BlipImageProcessor, BlipProcessor

    tokenizer, vocab = _word_tokenizer(
        {"unk_token": "[UNK]", "pad_token": "[PAD]", "bos_token": "[DEC]", "sep_token": "[SEP]", "cls_token": "[CLS]"}
    )
    tokenizer.model_max_length = 64
    config = BlipConfig(
        text_config={
            "vocab_size": vocab,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "max_position_embeddings": 64,
            "bos_token_id": tokenizer.bos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
            "sep_token_id": tokenizer.sep_token_id,
            "eos_token_id": tokenizer.sep_token_id,
        },
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": 32,
            "patch_size": 8,
        },
        projection_dim=32,
    )
    torch.manual_seed(0)
    BlipForConditionalGeneration(config).save_pretrained(dest)
    processor = BlipProcessor(BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer)
    processor.save_pretrained(dest)


def _tiny_llava(dest: Path) -> None:
    import torch
    from transformers import CLIPImageProcessor, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    tokenizer, vocab = _word_tokenizer(
        {"unk_token": "<unk>", "pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>"},
        extra=("<image>", "USER:", "ASSISTANT:"),
    )
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    image_token = tokenizer.convert_tokens_to_ids("<image>")
    config = LlavaConfig(
        vision_config={
            "model_type": "clip_vision_model",
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": 32,
            "patch_size": 8,
            "projection_dim": 32,
        },
        text_config={
            "model_type": "llama",
            "vocab_size": vocab,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_key_value_heads": 2,
            "max_position_embeddings": 256,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        },
        image_token_index=image_token,
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
    )
    torch.manual_seed(0)
    LlavaForConditionalGeneration(config).save_pretrained(dest)
    chat = (
        "{% for m in messages %}{% if m['role'] == 'user' %}USER: {% for c in m['content'] %}"
        "{% if c['type'] == 'image' %}<image> {% else %}{{ c['text'] }} {% endif %}{% endfor %}"
        "{% endif %}{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
    )
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    processor = LlavaProcessor(
        image_processor,
        tokenizer,
        patch_size=8,
        vision_feature_select_strategy="default",
        chat_template=chat,
        num_additional_image_tokens=1,  # the CLIP class token
    )
    processor.save_pretrained(dest)


def _tiny_florence2(dest: Path) -> None:
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (
        CLIPImageProcessor,
        Florence2Config,
        Florence2ForConditionalGeneration,
        Florence2Processor,
        PreTrainedTokenizerFast,
    )

    tokens = list(dict.fromkeys(["<unk>", "<pad>", "<s>", "</s>", "<image>", *_WORDS]))
    core = Tokenizer(models.WordLevel({t: i for i, t in enumerate(tokens)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        unk_token="<unk>",
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        extra_special_tokens={"image_token": "<image>"},
    )
    config = Florence2Config(
        vision_config={
            "depths": (1, 1),
            "patch_size": (7, 3),
            "patch_stride": (4, 2),
            "patch_padding": (3, 1),
            "patch_prenorm": (False, True),
            "embed_dim": (16, 32),
            "num_heads": (1, 2),
            "num_groups": (1, 2),
            "window_size": 2,
            "projection_dim": 32,
            "drop_path_rate": 0.0,
        },
        text_config={
            "model_type": "bart",
            "vocab_size": len(tokens),
            "d_model": 32,
            "encoder_layers": 1,
            "decoder_layers": 1,
            "encoder_attention_heads": 2,
            "decoder_attention_heads": 2,
            "encoder_ffn_dim": 64,
            "decoder_ffn_dim": 64,
            "max_position_embeddings": 128,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
            "decoder_start_token_id": tokenizer.eos_token_id,
        },
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
    )
    torch.manual_seed(0)
    model = Florence2ForConditionalGeneration(config)
    model.generation_config.min_new_tokens = 3  # a random decoder tends to stop at once; real models do not
    model.save_pretrained(dest)
    image_processor = CLIPImageProcessor(size={"height": 32, "width": 32}, do_center_crop=False)
    image_processor.image_seq_length = 17  # (32 / 4 / 2)^2 patches + 1 pooled token
    Florence2Processor(image_processor, tokenizer).save_pretrained(dest)


def write_tiny_captioners(dest: Path) -> dict[str, Path]:
    """Save three randomly initialised vision-language captioners (BLIP, LLaVA and native
    Florence-2 families, a few hundred kilobytes each) in transformers' native format under
    ``dest``; return {family: folder}.

    Their captions are gibberish; they exercise the real loading, batching and generation code.
    """
    dest = Path(dest)
    out = {"blip": dest / "tiny-blip", "llava": dest / "tiny-llava", "florence2": dest / "tiny-florence2"}
    _tiny_blip(out["blip"])
    _tiny_llava(out["llava"])
    _tiny_florence2(out["florence2"])
    return out
