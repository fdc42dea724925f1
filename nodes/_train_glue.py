"""ComfyUI glue for the trainer node: base-model folders, the run folder and its checks, the VAE decoder
for validation samples, applying the trained LoRA to a MODEL."""

from __future__ import annotations

from pathlib import Path

import comfy.latent_formats
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
            "start a fresh run, or set lora_name to the run you want to continue"
        }
    return {}


def vae_decoder(vae):
    if vae is None:
        return None

    def decode(latents: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():  # the trainer calls this with autograd on; ComfyUI's VAE is inference-only
            return vae.decode(comfy.latent_formats.SD3().process_out(latents)).float().cpu()

    return decode


def apply_lora(model, lora_path: Path):
    from safetensors.torch import load_file

    patched, _ = comfy.sd.load_lora_for_models(model, None, load_file(str(lora_path)), 1.0, 0.0)
    return patched
