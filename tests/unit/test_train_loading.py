"""Every SD3 file layout a ComfyUI user has loads to the same weights; bad files are refused by name."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from tools import model_formats as fmt
from tools import paths
from training.loading import ModelLoadError, load_base, load_from_state_dict
from training.loading.mmdit import diffusers_to_mmdit

SD35 = paths.MODELS / "checkpoints" / paths.SD35_CHECKPOINT


@pytest.fixture(scope="module")
def mm() -> dict[str, torch.Tensor]:
    """The built-in SD3.5 tiny transformer's MMDiT weights (bare keys), fp32."""
    full = load_file(str(SD35))
    return {k.removeprefix(fmt.PREFIX): v for k, v in full.items() if k.startswith(fmt.PREFIX)}


@pytest.fixture(scope="module")
def reference(mm):
    return load_from_state_dict(dict(mm), name="reference").state_dict()


def _dequantised(mm: dict) -> dict:
    """What an fp8 file holds, as real numbers: every Linear weight through fp8 and back."""
    out = {}
    for k, v in mm.items():
        if fmt.is_quantisable(k, v):
            q, scale = fmt.to_fp8(v)
            out[k] = q.float() * scale
        else:
            out[k] = v
    return out


def _same(got: dict, want: dict, tol: float = 0.0) -> None:
    assert got.keys() == want.keys()
    for k in want:
        assert torch.allclose(got[k].float(), want[k].float(), rtol=0, atol=tol), k


def _save(tmp_path, name, tensors, metadata=None):
    path = tmp_path / name
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    return path


def test_stability_layouts_load_the_same_weights(tmp_path, mm, reference):
    vae = {"encoder.conv_in.weight": torch.randn(4, 3, 3, 3)}
    tes = {f"{t}.transformer.x.weight": torch.randn(2, 2) for t in ("clip_l", "clip_g", "t5xxl")}
    files = {
        "bare": fmt.stability(mm, prefix=""),
        "prefixed": fmt.stability(mm),
        "with_vae": fmt.stability(mm, first_stage_model=vae),
        "all_in_one": fmt.stability(mm, first_stage_model=vae, text_encoders=tes),
        "diffusers": dict(reference),
    }
    for name, tensors in files.items():
        model = load_base(_save(tmp_path, f"{name}.safetensors", tensors))
        _same(model.state_dict(), reference)


@pytest.mark.parametrize(
    "variant",
    ["scaled_e4m3_marker", "scaled_f32_marker", "scaled_with_scale_input", "comfy_quant", "header", "plain"],
)
def test_fp8_layouts_load_their_dequantised_weights(tmp_path, mm, variant):
    if variant == "plain":
        tensors, meta = fmt.fp8_plain(mm), None
        want_mm = {k: v.to(torch.float8_e4m3fn).float() if fmt.is_quantisable(k, v) else v for k, v in mm.items()}
        # plain fp8 of a tiny random model is in the sane band: values are the weights themselves
    elif variant.startswith("scaled"):
        marker = torch.float32 if "f32" in variant else torch.float8_e4m3fn
        tensors, meta = fmt.fp8_scaled(mm, marker=marker, scale_input="input" in variant), None
        want_mm = _dequantised(mm)
    else:
        tensors, meta = fmt.fp8_layerwise(mm, header=variant == "header")
        want_mm = _dequantised(mm)
    model = load_base(_save(tmp_path, f"{variant}.safetensors", tensors, meta))
    want = load_from_state_dict(want_mm, name="want").state_dict()
    _same(model.state_dict(), want, tol=1e-7)


def test_gguf_loads_to_the_gguf_packages_own_dequantisation(tmp_path, mm):
    pytest.importorskip("gguf", reason="gguf is in requirements-dev.txt")
    path = fmt.write_gguf(mm, tmp_path / "tiny.gguf", "Q8_0")
    model = load_base(path)
    want = load_from_state_dict(fmt.gguf_reference_weights(path), name="gguf reference").state_dict()
    from training.loading.gguf import dequantized, is_gguf

    assert type(model.transformer_blocks[0].attn.to_q).__name__ == "GGUFLinear"
    got = {k: dequantized(v) if is_gguf(v) else v for k, v in model.state_dict().items()}
    _same(got, want, tol=1e-4)  # diffusers dequantises in fp16


def test_the_silent_fp8_misload_is_refused(tmp_path, mm):
    """Issue 8's case: fp8 weights stored as w / s; reading them without s is off by ~1e2-1e4."""
    scaled = fmt.fp8_scaled(mm)
    no_scales = {k: v for k, v in scaled.items() if not k.endswith(".scale_weight")}
    with pytest.raises(ModelLoadError, match=r"implausible weights .*RMS"):
        load_base(_save(tmp_path, "lost_scales.safetensors", no_scales))
    no_marker = {k: v for k, v in no_scales.items() if not k.endswith("scaled_fp8")}
    with pytest.raises(ModelLoadError, match="implausible weights"):
        load_base(_save(tmp_path, "lost_marker.safetensors", no_marker))
    orphan = {k: v for k, v in scaled.items() if not k.endswith("scaled_fp8")}
    with pytest.raises(ModelLoadError, match=r"scale_weight'? is an fp8 scale but the file has no"):
        load_base(_save(tmp_path, "orphan_scale.safetensors", orphan))


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        ({"model.diffusion_model.joint_blocks.0.x_block.attn.extra.weight": torch.ones(2)}, "attn.extra.weight"),
        ({"model.diffusion_model.nowhere.scale_weight": torch.ones(())}, "has no layer"),
        ({"lora_unet_x.alpha": torch.ones(())}, "lora_unet_x.alpha"),
        ({"model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight_scale_2": torch.ones(())}, "cannot read"),
    ],
)
def test_unknown_tensors_are_refused_naming_key_and_file(tmp_path, mm, extra, match):
    path = _save(tmp_path, "odd.safetensors", {**fmt.stability(mm), **extra})
    with pytest.raises(ModelLoadError, match=match) as err:
        load_base(path)
    assert "odd.safetensors" in str(err.value)


def test_unknown_quantisation_format_is_refused(tmp_path, mm):
    tensors, _ = fmt.fp8_layerwise(mm)
    key = "model.diffusion_model.joint_blocks.1.x_block.mlp.fc1.comfy_quant"
    tensors[key] = torch.tensor(list(json.dumps({"format": "nvfp4"}).encode()), dtype=torch.uint8)
    with pytest.raises(ModelLoadError, match=r"joint_blocks\.1\.x_block\.mlp\.fc1 is quantised as 'nvfp4'"):
        load_base(_save(tmp_path, "nvfp4.safetensors", tensors))


def test_state_dict_source_shares_tensors_and_fused_qkv_are_views(mm):
    model = load_from_state_dict(mm, dtype="fp32")
    qkv = mm["joint_blocks.0.x_block.attn.qkv.weight"]
    to_k = model.transformer_blocks[0].attn.to_k.weight
    assert to_k.untyped_storage().data_ptr() == qkv.untyped_storage().data_ptr()
    assert torch.equal(to_k, qkv.chunk(3)[1])
    assert model.context_embedder.weight.data_ptr() == mm["context_embedder.weight"].data_ptr()


@pytest.mark.parametrize("quant", ["int8", "int4"])
def test_block_by_block_quantisation_equals_quantising_after_loading(mm, quant):
    from training.loading import quantize_base

    whole = load_from_state_dict(dict(mm), dtype="bf16")
    quantize_base(whole, quant)
    streamed = load_from_state_dict(dict(mm), dtype="bf16", quantization=quant)
    assert type(streamed.transformer_blocks[1].ff.net[2]).__name__ == "QLinear"
    x = dict(
        hidden_states=torch.randn(1, 16, 8, 8),
        encoder_hidden_states=torch.randn(1, 8, 4096),
        pooled_projections=torch.randn(1, 2048),
        timestep=torch.tensor([500.0]),
    )
    with torch.no_grad():
        a = whole(**{k: v.bfloat16() for k, v in x.items()}).sample
        b = streamed(**{k: v.bfloat16() for k, v in x.items()}).sample
    assert torch.equal(a, b)


@pytest.mark.parametrize("quant", ["none", "int8", "int4"])
def test_a_non_finite_weight_is_refused_naming_the_file_and_key(mm, quant):
    damaged = dict(mm)
    key = "joint_blocks.1.x_block.mlp.fc2.weight"
    damaged[key] = damaged[key].clone()
    damaged[key][3, 5] = float("inf")
    with pytest.raises(ModelLoadError, match=r"damaged\.safetensors(.|\n)*transformer_blocks\.1\.ff\.net\.2\.weight"):
        load_from_state_dict(damaged, dtype="bf16", quantization=quant, name="damaged.safetensors")


def test_round_trip_of_the_key_map(mm, reference):
    back = diffusers_to_mmdit(reference)
    assert back.keys() == mm.keys()
    assert all(torch.equal(back[k], mm[k]) for k in mm)


def test_inference_tensors_are_shared_as_normal_tensors_autograd_accepts(mm):
    """ComfyUI builds its models under inference_mode; training on them must neither copy nor fail."""
    with torch.inference_mode():
        inference = {k: v.clone() for k, v in mm.items()}
    model = load_from_state_dict(inference, dtype="fp32")
    to_q = model.transformer_blocks[0].attn.to_q.weight
    assert not to_q.is_inference()
    assert to_q.untyped_storage().data_ptr() == inference["joint_blocks.0.x_block.attn.qkv.weight"].data_ptr()
    x = torch.randn(1, 16, 8, 8, requires_grad=True)
    out = model(
        hidden_states=x,
        encoder_hidden_states=torch.randn(1, 8, 4096),
        pooled_projections=torch.randn(1, 2048),
        timestep=torch.tensor([500.0]),
    ).sample
    out.square().mean().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
