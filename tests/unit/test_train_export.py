from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from tools import paths
from training.export import export_lora
from training.model import add_lora, load_transformer, lora_target_modules

SD35 = paths.MODELS / "checkpoints" / paths.SD35_CHECKPOINT


@pytest.fixture(scope="module")
def base():
    return load_transformer(SD35)


def _inputs():
    g = torch.Generator().manual_seed(5)
    return dict(
        hidden_states=torch.randn(1, 16, 8, 8, generator=g),
        encoder_hidden_states=torch.randn(1, 8, 4096, generator=g),
        pooled_projections=torch.randn(1, 2048, generator=g),
        timestep=torch.tensor([700.0]),
    )


def _trained(base, preset: str, rank: int, alpha: float, blocks: str = ""):
    """A LoRA with non-zero, random A and B (as after training)."""
    model = copy.deepcopy(base)
    spec = add_lora(model, rank=rank, alpha=alpha, targets=lora_target_modules(model, preset, blocks=blocks))
    g = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    return model, spec


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize(("preset", "rank", "alpha", "blocks"), [("all_linear", 4, 12, ""), ("attention", 8, 8, "1")])
def test_exported_file_has_diffusers_keys_alpha_folded_and_header(base, tmp_path, preset, rank, alpha, blocks):
    model, spec = _trained(base, preset, rank, alpha, blocks)
    path = export_lora(model, spec, tmp_path / "out.safetensors", {"steps": 10, "base_model": "sd35_tiny"})
    tensors = load_file(str(path))
    assert len(tensors) == 2 * len(spec.targets)
    for target in spec.targets:
        a, b = tensors[f"transformer.{target}.lora_A.weight"], tensors[f"transformer.{target}.lora_B.weight"]
        module = dict(model.named_modules())[target]
        torch.testing.assert_close(a, module.lora_A["default"].weight)
        torch.testing.assert_close(b, module.lora_B["default"].weight * alpha / rank)
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    assert meta["sd35_tuner.rank"] == str(rank) and float(meta["sd35_tuner.alpha"]) == alpha
    assert json.loads(meta["sd35_tuner.targets"]) == list(spec.targets)
    assert meta["sd35_tuner.steps"] == "10" and meta["sd35_tuner.base_model"] == "sd35_tiny"
    assert not list(tmp_path.glob(".*.tmp"))


def test_file_merged_into_plain_weights_equals_the_peft_forward(base, tmp_path):
    model, spec = _trained(base, "all_linear", rank=4, alpha=16)
    tensors = load_file(str(export_lora(model, spec, tmp_path / "l.safetensors")))
    merged = copy.deepcopy(base)
    modules = dict(merged.named_modules())
    with torch.no_grad():
        for target in spec.targets:
            a, b = tensors[f"transformer.{target}.lora_A.weight"], tensors[f"transformer.{target}.lora_B.weight"]
            modules[target].weight += b @ a  # strength 1.0, no alpha: how ComfyUI applies it
        want, got, plain = model(**_inputs()).sample, merged(**_inputs()).sample, base(**_inputs()).sample
    assert _rel(got, want) <= 1e-4
    assert _rel(plain, want) > 1e-2  # the LoRA does change the output


def test_diffusers_load_lora_adapter_gives_the_peft_forward(base, tmp_path):
    model, spec = _trained(base, "attention_ff", rank=4, alpha=2)
    path = export_lora(model, spec, tmp_path / "l.safetensors")
    fresh = copy.deepcopy(base)
    fresh.load_lora_adapter(load_file(str(path)), prefix="transformer", adapter_name="trained")
    with torch.no_grad():
        assert _rel(fresh(**_inputs()).sample, model(**_inputs()).sample) <= 1e-4


def test_export_dtype(base, tmp_path):
    model, spec = _trained(base, "attention", rank=2, alpha=2)
    tensors = load_file(str(export_lora(model, spec, tmp_path / "l.safetensors", dtype="bf16")))
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16}


def test_output_path_is_confined_and_versioned(tmp_path):
    from training.export import output_path

    assert output_path(tmp_path, "style") == (tmp_path / "style.safetensors").resolve()
    assert output_path(tmp_path, "people/style.safetensors") == (tmp_path / "people" / "style.safetensors").resolve()
    (tmp_path / "style.safetensors").write_bytes(b"x")
    (tmp_path / "style_2.safetensors").write_bytes(b"x")
    assert output_path(tmp_path, "style").name == "style_3.safetensors"
    for bad in ("../escape", "/etc/passwd", "", "a/../../b", "c:evil"):
        with pytest.raises(ValueError, match="lora_name"):
            output_path(tmp_path, bad)


@pytest.mark.parametrize(
    "name", [".", ".safetensors", "..safetensors", ".hidden", "people/.hidden", "a//b", "style/", "./x"]
)
def test_names_that_would_make_hidden_or_unlisted_files_are_refused(tmp_path, name):
    """'.' would write '..safetensors', a file ComfyUI's LoRA list never shows."""
    from training.export import output_path

    with pytest.raises(ValueError, match=r"lora_name .* is not a plain file name.*no part starting with '\.'"):
        output_path(tmp_path, name)
    assert list(tmp_path.iterdir()) == []


def test_a_planted_link_in_the_lora_folder_is_not_followed_outside(tmp_path):
    from training.export import output_path

    (tmp_path / "loras").mkdir()
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "loras" / "people").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    with pytest.raises(ValueError, match=r"lora_name 'people/style.safetensors' resolves to .*elsewhere.*outside"):
        output_path(tmp_path / "loras", "people/style")


def test_written_files_are_readable_by_other_users(tmp_path):
    import stat

    import torch

    from training.fs import atomic_save_safetensors, atomic_write_text

    atomic_save_safetensors(tmp_path / "lora.safetensors", {"w": torch.zeros(2)}, {"k": "v"})
    atomic_write_text(tmp_path / "note.json", "{}")
    for name in ("lora.safetensors", "note.json"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o644
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
