from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from tools import paths
from tools.tiny_models import transformer_config
from training.model import (
    ModelLoadError,
    add_lora,
    config_from_state_dict,
    count_trainable,
    load_transformer,
    lora_target_modules,
    parse_blocks,
    quantize_base,
)

SD3 = paths.MODELS / "checkpoints" / paths.SD3_CHECKPOINT
SD35 = paths.MODELS / "checkpoints" / paths.SD35_CHECKPOINT


def _inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return dict(
        hidden_states=torch.randn(1, 16, 8, 8, generator=g),
        encoder_hidden_states=torch.randn(1, 8, 4096, generator=g),
        pooled_projections=torch.randn(1, 2048, generator=g),
        timestep=torch.tensor([500.0]),
    )


@pytest.mark.parametrize(("path", "sd35"), [(SD3, False), (SD35, True)])
def test_config_derived_from_shapes_matches_the_generator(path, sd35):
    model = load_transformer(path)
    want = transformer_config(2, sd35)
    got = dict(model.config)
    for key in ("patch_size", "in_channels", "out_channels", "num_layers", "attention_head_dim"):
        assert got[key] == want[key], key
    assert got["num_attention_heads"] == want["num_attention_heads"]
    assert got["joint_attention_dim"] == 4096 and got["pooled_projection_dim"] == 2048
    assert tuple(got["dual_attention_layers"]) == tuple(want.get("dual_attention_layers", ()))
    assert got["qk_norm"] == want.get("qk_norm")


def test_stability_bare_and_diffusers_keys_load_to_the_same_model(tmp_path):
    ref = load_transformer(SD3)
    full = load_file(str(SD3))
    bare = {k.removeprefix("model.diffusion_model."): v for k, v in full.items() if k.startswith("model.")}
    save_file(bare, str(tmp_path / "bare.safetensors"))
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(tmp_path / "diffusers.safetensors"))
    want = ref.state_dict()
    for name in ("bare", "diffusers"):
        got = load_transformer(tmp_path / f"{name}.safetensors").state_dict()
        assert got.keys() == want.keys()
        assert all(torch.equal(got[k], want[k]) for k in want), name


def test_diffusers_folder_loads_offline(tmp_path):
    ref = load_transformer(SD35)
    ref.save_pretrained(tmp_path / "pipe" / "transformer")
    got = load_transformer(tmp_path / "pipe").state_dict()
    assert all(torch.equal(got[k], v) for k, v in ref.state_dict().items())


@pytest.mark.parametrize(
    ("keys", "family"),
    [
        ({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1)}, "SDXL"),
        ({"double_blocks.0.img_attn.qkv.weight": torch.zeros(1)}, "Flux"),
        ({"model.diffusion_model.double_blocks.0.img_attn.qkv.weight": torch.zeros(1)}, "Flux"),
        ({"something.else": torch.zeros(1)}, "no SD3 transformer keys"),
    ],
)
def test_wrong_family_is_refused_with_its_name(tmp_path, keys, family):
    path = tmp_path / "other.safetensors"
    save_file(keys, str(path))
    with pytest.raises(ModelLoadError, match=family):
        load_transformer(path)


def test_missing_and_pickle_files_are_refused(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_transformer(tmp_path / "nope.safetensors")
    (tmp_path / "model.ckpt").write_bytes(b"x")
    with pytest.raises(ModelLoadError, match="never pickle"):
        load_transformer(tmp_path / "model.ckpt")


def test_config_requires_pos_embed():
    sd = {k: v for k, v in load_transformer(SD3).state_dict().items() if k != "pos_embed.pos_embed"}
    with pytest.raises(ModelLoadError, match="pos_embed"):
        config_from_state_dict(sd)


def test_presets_and_block_ranges_select_the_named_layers():
    model = load_transformer(SD35)
    attention = lora_target_modules(model, "attention")
    assert "transformer_blocks.0.attn2.to_q" in attention and "transformer_blocks.1.attn.to_out.0" in attention
    assert not any("add_" in n or "ff" in n for n in attention)
    context = lora_target_modules(model, "context_stream")
    assert context and all("add_" in n or "ff_context" in n or "norm1_context" in n for n in context)
    x_stream = lora_target_modules(model, "x_stream")
    assert not set(x_stream) & set(context)
    everything = lora_target_modules(model, "all_linear")
    assert set(x_stream) | set(context) == set(everything)
    block1 = lora_target_modules(model, "all_linear", blocks="1")
    assert block1 and all(n.startswith("transformer_blocks.1.") for n in block1)
    assert lora_target_modules(model, "all_linear", exclude_blocks="0") == block1
    with pytest.raises(ValueError, match="outside the model's blocks 0-1"):
        lora_target_modules(model, "attention", blocks="12-24")
    with pytest.raises(ValueError, match="preset"):
        lora_target_modules(model, "everything")


def test_parse_blocks():
    assert parse_blocks("", 4) == [0, 1, 2, 3]
    assert parse_blocks("0-1, 3", 4) == [0, 1, 3]
    with pytest.raises(ValueError, match="cannot read"):
        parse_blocks("a-b", 4)


def test_trainable_count_is_the_lora_size():
    model = load_transformer(SD3)
    targets = lora_target_modules(model, "attention")
    add_lora(model, rank=4, alpha=4, targets=targets)
    modules = dict(model.named_modules())
    want = sum(4 * (modules[t].base_layer.in_features + modules[t].base_layer.out_features) for t in targets)
    assert count_trainable(model) == want


def test_quantised_base_keeps_a_float_lora_that_gets_gradients():
    model = load_transformer(SD3)
    quantize_base(model, "int8")
    assert type(model.transformer_blocks[0].attn.to_q).__name__ == "QLinear"
    add_lora(model, rank=4, alpha=4, targets=lora_target_modules(model, "attention"))
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and all(p.requires_grad and p.dtype == torch.float32 for p in lora_b)
    assert all(not p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)
    model(**_inputs()).sample.square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in lora_b)


def test_the_light_options_module_names_every_preset():
    from training.model import PRESETS
    from training.options import PRESET_NAMES

    assert tuple(PRESETS) == PRESET_NAMES
