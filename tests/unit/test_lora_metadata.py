"""The LoRA header speaks ModelSpec and kohya's ss_* keys: a reader written against those keys finds them."""

from __future__ import annotations

import hashlib
import json
import re
from datetime import datetime
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open

from tools import paths
from training.config import TrainConfig
from training.data import TensorSource
from training.metadata import SD3_MEDIUM, SD35_LARGE, SD35_MEDIUM, sd3_variant, trigger_phrase
from training.run import run_training

CAPTIONS = ["k4s4, a woman on a bench", "k4s4, a woman in a red coat, smiling", "k4s4, portrait, smiling"]


def read_like_a_model_browser(path) -> dict:
    """What ModelSpec readers (Civitai, Forge, Manager's model views) and kohya's ss_* readers pull out."""
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    arch = re.fullmatch(r"stable-diffusion-3-(medium|5-medium|5-large)/lora", meta["modelspec.architecture"])
    width, height = map(int, re.fullmatch(r"(\d+)x(\d+)", meta["modelspec.resolution"]).groups())
    return {
        "spec": meta["modelspec.sai_model_spec"],
        "variant": arch.group(1),
        "implementation": meta["modelspec.implementation"],
        "title": meta["modelspec.title"],
        "date": datetime.fromisoformat(meta["modelspec.date"]),
        "resolution": (width, height),
        "trigger": meta.get("modelspec.trigger_phrase"),
        "description": meta["modelspec.description"],
        "dim": int(meta["ss_network_dim"]),
        "alpha": float(meta["ss_network_alpha"]),
        "lr": float(meta["ss_learning_rate"]),
        "steps": int(meta["ss_max_train_steps"]),
        "epochs": int(meta["ss_num_epochs"]),
        "images": int(meta["ss_num_train_images"]),
        "model": meta["ss_sd_model_name"],
        "legacy_hash": meta["ss_sd_model_hash"],
        "sha256": meta["ss_new_sd_model_hash"],
        "base_version": meta["ss_base_model_version"],
        "kohya_resolution": tuple(json.loads(meta["ss_resolution"].replace("(", "[").replace(")", "]"))),
        "tags": json.loads(meta["ss_tag_frequency"]),
        "ours": {k: v for k, v in meta.items() if k.startswith("sd35_tuner.")},
    }


def _source() -> TensorSource:
    g = torch.Generator().manual_seed(0)
    n = len(CAPTIONS)
    return TensorSource(
        [torch.randn(16, 8, 12, generator=g) for _ in range(n)],  # 12x8 latents = 96x64 pixels
        [torch.randn(8, 4096, generator=g) for _ in range(n)],
        [torch.randn(2048, generator=g) for _ in range(n)],
        captions=CAPTIONS,
        meta={"latent_channels": 16, "text_dim": 4096, "pooled_dim": 2048},
    )


@pytest.mark.parametrize(
    ("checkpoint", "variant"), [(paths.SD35_CHECKPOINT, "5-medium"), (paths.SD3_CHECKPOINT, "medium")]
)
def test_a_reader_of_modelspec_and_kohya_keys_finds_the_run(tmp_path, checkpoint, variant):
    base = paths.MODELS / "checkpoints" / checkpoint
    cfg = TrainConfig(steps=4, batch_size=2, learning_rate=2e-3, rank=2, alpha=4, save_dtype="fp32")
    out = run_training(base, _source(), cfg, tmp_path / "loras" / "k4s4_style.safetensors", tmp_path / "run")
    got = read_like_a_model_browser(out.lora_path)

    data = base.read_bytes()
    assert got["sha256"] == hashlib.sha256(data).hexdigest()
    assert got["legacy_hash"] == hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]  # A1111's old hash
    assert got["spec"] == "1.0.1" and got["variant"] == variant == got["base_version"]
    assert got["implementation"] == "diffusers" and got["title"] == "k4s4_style" and got["model"] == checkpoint
    assert got["date"].tzinfo is not None
    assert got["resolution"] == got["kohya_resolution"] == (96, 64)
    assert got["trigger"] == "k4s4"
    assert (got["dim"], got["alpha"], got["lr"], got["steps"], got["images"]) == (2, 4.0, 2e-3, 4, 3)
    assert got["epochs"] == 3  # 4 steps x batch 2 over 3 samples
    assert got["tags"] == {
        "dataset": {"k4s4": 3, "a woman on a bench": 1, "a woman in a red coat": 1, "smiling": 2, "portrait": 1}
    }
    assert "rank 2, alpha 4" in got["description"] and "learning rate 0.002" in got["description"]
    assert got["ours"]["sd35_tuner.rank"] == "2" and got["ours"]["sd35_tuner.steps"] == "4"
    assert "sd35_tuner.captions" not in got["ours"]  # the captions feed the keys above, not a copy of themselves


def test_kohya_model_types_from_the_transformer_config():
    assert sd3_variant(SimpleNamespace(qk_norm=None, dual_attention_layers=())) == SD3_MEDIUM
    assert sd3_variant(SimpleNamespace(qk_norm="rms_norm", dual_attention_layers=(0, 1, 2))) == SD35_MEDIUM
    assert sd3_variant(SimpleNamespace(qk_norm="rms_norm", dual_attention_layers=())) == SD35_LARGE


def test_trigger_phrase_is_the_lead_every_caption_shares():
    assert trigger_phrase(CAPTIONS) == "k4s4"
    assert trigger_phrase(["k4s4, a", "other, b"]) is None
    assert trigger_phrase(["just one caption"]) is None
