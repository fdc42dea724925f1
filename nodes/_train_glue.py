"""ComfyUI glue for the trainer node: base-model folders, the run folder and its checks, the VAE decoder
for validation samples, applying the trained LoRA to a MODEL."""

from __future__ import annotations

from pathlib import Path

import comfy.latent_formats
import comfy.model_base
import comfy.sd
import comfy.utils
import folder_paths
import torch

MODEL_FOLDERS = ("checkpoints", "diffusion_models")
RUNS_FOLDER = "sd35_tuner_runs"  # under ComfyUI's output folder: one folder of checkpoints + samples per LoRA name


def base_model_options() -> list[str]:
    """The files in checkpoints/ and diffusion_models/; ComfyUI lists only its own extensions there, so
    GGUF files (ComfyUI-GGUF's, which we load too) are added."""
    names = {name for folder in MODEL_FOLDERS for name in folder_paths.get_filename_list(folder)}
    for folder in MODEL_FOLDERS:
        for root in folder_paths.get_folder_paths(folder):
            names.update(name for name in folder_paths.recursive_search(root)[0] if name.endswith(".gguf"))
    return sorted(names)


def base_model_path(choice: str) -> Path:
    path = next(filter(None, (folder_paths.get_full_path(folder, choice) for folder in MODEL_FOLDERS)), None)
    if path is None:
        raise ValueError(
            f"base_model {choice!r} was not found in ComfyUI's checkpoints/ or diffusion_models/ folders; "
            "put an SD3 / SD3.5 .safetensors (or .gguf) file there and refresh"
        )
    return Path(path)


def check_model_input(model, base_model: str) -> None:
    """The trainer's ``model`` input, if any, is an SD3/SD3.5 MODEL; base_model '(use the MODEL input)' needs one."""
    from ._model_base import FROM_MODEL

    if model is None and base_model == FROM_MODEL:
        raise ValueError(f"base_model is '{FROM_MODEL}' but nothing is connected to 'model': connect a MODEL")
    if model is not None and not isinstance(model.model, comfy.model_base.SD3):
        raise ValueError(
            f"model: got a {type(model.model).__name__} model; connect the SD3/SD3.5 MODEL the LoRA should be "
            "applied to (or leave 'model' empty)"
        )


def training_base(model, base_model: str):
    """What the run trains: the connected MODEL's weights (named after base_model when that names a file),
    else the base_model file."""
    from ._model_base import FROM_MODEL, graph_base

    if model is not None:
        return graph_base(model, None if base_model == FROM_MODEL else base_model)
    return base_model_path(base_model)


def run_notes(archived: Path | None) -> list[str]:
    """What the node says after a run besides the loss: where a fresh run moved an earlier run's files."""
    if archived is None:
        return []
    where = f"output/{output_relative(archived)}"
    return [
        f"This run started fresh (resume off), so the earlier run's checkpoints and validation images in this "
        f"run folder were moved to {where}/. To continue that run, move its checkpoint-* folders back and tick "
        "resume; otherwise delete the folder when you no longer need it."
    ]


def output_relative(path: Path) -> str:
    """``path`` (inside ComfyUI's output folder) relative to that folder, as the node shows it."""
    return path.resolve().relative_to(Path(folder_paths.get_output_directory()).resolve()).as_posix()


def run_dir(lora_name: str) -> Path:
    """``output/sd35_tuner_runs/<lora_name>``: checkpoints and validation samples of the run, keyed by the name
    asked for (not the ``_2`` version written), so ``resume`` finds them. Resolved and confined to output/."""
    from ..training.fs import resolve_inside

    stem = lora_name.strip().removesuffix(".safetensors")  # a link at RUNS_FOLDER itself must not lead out either
    return resolve_inside(folder_paths.get_output_directory(), f"{RUNS_FOLDER}/{stem}", "lora_name's run folder")


def run_problems(lora_name: str, resume: bool) -> dict[str, str]:
    """lora_name must make a LoRA file inside models/loras; ``resume`` needs a checkpoint of that name."""
    from ..training.checkpoint import list_checkpoints
    from ..training.export import output_path

    try:
        output_path(folder_paths.get_folder_paths("loras")[0], lora_name)
        folder = run_dir(lora_name)
    except ValueError as err:
        return {"lora_name": str(err)}
    if resume and not list_checkpoints(folder):
        return {
            "resume": f"resume: no checkpoint of '{lora_name}' to continue from in {folder}; untick resume to "
            "start a fresh run, or set lora_name to the run you want to continue" + archived_hint(folder)
        }
    return {}


def archived_hint(folder: Path) -> str:
    """Where earlier runs' checkpoints were moved by fresh runs in ``folder`` (``previous-*``), as advice."""
    from ..training.checkpoint import list_checkpoints
    from ..training.run_folder import ARCHIVE_PREFIX

    kept = sorted(p.name for p in folder.glob(f"{ARCHIVE_PREFIX}*") if p.is_dir() and list_checkpoints(p))
    if not kept:
        return ""
    return (
        f". Earlier runs' checkpoints were moved to {', '.join(kept)} in that folder (a fresh run does that): "
        "move a checkpoint-* folder from there back into it to continue that run"
    )


def vae_decoder(vae):
    if vae is None:
        return None

    def decode(latents: torch.Tensor) -> torch.Tensor:
        """One sample at a time: ComfyUI batches a CPU decode as RAM allows, and a batch's activations
        stack on top of the training run's memory."""
        with torch.inference_mode():  # the trainer calls this with autograd on; ComfyUI's VAE is inference-only
            process = comfy.latent_formats.SD3().process_out
            return torch.cat([vae.decode(process(one[None])).float().cpu() for one in latents])

    return decode


def apply_lora(model, lora_path: Path):
    """A clone of ``model`` that computes with the trained LoRA in it, as ComfyUI's own trainer returns
    its MODEL: each targeted layer's LoRA is added to a transient copy of its weight when the layer
    computes (ComfyUI's ``LowVramPatch`` as a weight wrapper), so no patched copy of every targeted
    weight sits in RAM beside the original while the graph samples (+0.67 GiB for an attention LoRA
    on SD3.5 Medium). Saving this MODEL as a checkpoint does not bake the LoRA in: the LoRA file
    (LoraLoader) does that."""
    import comfy.lora
    import comfy.model_patcher
    from safetensors.torch import load_file

    keys = comfy.lora.model_lora_keys_unet(model.model, {})
    grouped = model.clone()  # add_patches groups q/k/v slices of SD3's fused qkv under one weight key
    grouped.add_patches(comfy.lora.load_lora(load_file(str(lora_path)), keys), 1.0)
    patched = model.clone()
    for key, patches in grouped.patches.items():
        patched.add_weight_wrapper(key, comfy.model_patcher.LowVramPatch(key, {key: patches}))
    return patched
