"""The bundled workflows as data: nodes with widget values by input name, links by socket name,
groups of columns, one note each. ``tools/build_workflows.py`` turns them into the UI-format files
in ``example_workflows/`` through the real frontend (which sizes the nodes and writes the JSON), so a
schema change is picked up by re-running it; a widget name the schema no longer has stops the build.

The file name is the title the Templates dialog shows, so it reads as one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import paths

HF_SD35 = "https://huggingface.co/stabilityai/stable-diffusion-3.5-large/resolve/main"
BASE_MODEL = "sd3.5_large.safetensors"
TEXT_ENCODERS = ("clip_l.safetensors", "clip_g.safetensors", "t5xxl_fp16.safetensors")
SAMPLE_FOLDER = "sd35_tuner_sample"  # a folder under input/ that a user does not have: the frontend flags it
FROM_MODEL = "(use the MODEL input)"  # the trainer's base_model choice for the connected MODEL (nodes/_model_base.py)
TRIGGER = "k4s4"
PROMPT = f"{TRIGGER}, a portrait photo of a person in a park"
NEGATIVE = "blurry, cropped, ugly"
FIXED_SEED = {"control_after_generate": "fixed"}  # the frontend adds this widget after every 'seed'
APG = {"eta": 0.0, "norm_threshold": 15.0, "threshold_mode": "scaled", "momentum": -0.5}

PIPELINE = "SD3.5 LoRA - full pipeline from photos to CFG vs APG"
DATASET_PREP = "SD3.5 LoRA - prepare a dataset"
TRAIN = "SD3.5 LoRA - train and sample with APG"
CFG_VS_APG = "SD3.5 - CFG vs APG side by side"


def bundled(name: str) -> Path:
    """The file of a bundled workflow, e.g. ``bundled(PIPELINE)``."""
    return paths.WORKFLOWS / f"{name}.json"


def model(name: str, directory: str, url: str) -> dict[str, str]:
    """A ``properties.models`` entry: the frontend's missing-models dialog lists it when the file is absent."""
    return {"name": name, "url": url, "directory": directory}


CHECKPOINT_MODELS = [model(BASE_MODEL, "checkpoints", f"{HF_SD35}/{BASE_MODEL}")]
CLIP_MODELS = [model(n, "text_encoders", f"{HF_SD35}/text_encoders/{n}") for n in TEXT_ENCODERS]


@dataclass
class Node:
    key: str
    type: str
    values: dict[str, Any] = field(default_factory=dict)  # widget name -> value; the rest keep their defaults
    title: str | None = None
    width: int = 340
    height: int = 0  # at least this tall (the frontend may need more)
    models: list[dict[str, str]] = field(default_factory=list)


@dataclass
class Group:
    title: str
    columns: list[list[Node]]
    color: str


@dataclass
class Workflow:
    name: str
    note: str
    groups: list[Group]
    links: list[tuple[str, str]]  # ("node.output", "node.input")

    def nodes(self) -> list[Node]:
        return [n for g in self.groups for column in g.columns for n in column]


# Group colours from the frontend's palette (LGraphCanvas.node_colors ...groupcolor).
BLUE, GREEN, YELLOW, PURPLE, CYAN = "#3f789e", "#8A8", "#b58b2a", "#a1309b", "#88A"


def checkpoint_loader() -> Node:
    return Node(
        "ckpt", "CheckpointLoaderSimple", {"ckpt_name": BASE_MODEL}, "Load SD3.5 checkpoint", models=CHECKPOINT_MODELS
    )


def clip_loader() -> Node:
    values = dict(zip(("clip_name1", "clip_name2", "clip_name3"), TEXT_ENCODERS, strict=True))
    return Node("clip", "TripleCLIPLoader", values, "SD3.5 text encoders", models=CLIP_MODELS)


def load_and_crop(resolution: int, max_upscale: float) -> list[list[Node]]:
    return [
        [Node("load", "SD35TunerLoadDataset", {"folder": SAMPLE_FOLDER})],
        [Node("crop", "SD35TunerSmartCrop", {"resolution": resolution, "max_upscale": max_upscale})],
    ]


def cache_columns() -> list[list[Node]]:
    return [
        [checkpoint_loader(), clip_loader()],
        [Node("cache", "SD35TunerCacheLatents", width=360)],
    ]


def train_columns(chart: Node) -> list[list[Node]]:
    """Settings -> trainer -> the loss chart, left to right. The trainer trains on the checkpoint loader's MODEL
    (loaded once, shared) and hands it on, LoRA applied, to the next group."""
    values = {"base_model": FROM_MODEL, "lora_name": "my_sd35_lora", "steps": 1000, "quantization": "int8"}
    values |= {"validation_prompts": PROMPT, "validation_every": 200}
    return [
        [Node("settings", "SD35TunerTrainSettings", {"max_grad_norm": 0.1})],
        [Node("train", "SD35TunerTrainLora", values, width=380)],
        [chart],
    ]


def compare_columns(prefix: str) -> list[list[Node]]:
    """The comparison node (its viewer needs the height) and the saved side-by-side picture."""
    values = {"seed": 42, **FIXED_SEED, "steps": 28, **APG}
    return [
        [Node("compare", "SD35TunerCompareCFGAPG", values, width=420, height=760)],
        [Node("save", "SaveImage", {"filename_prefix": prefix}, "Save CFG vs APG", width=420)],
    ]


# cache_columns() + train_columns() wired to each other and to the loaders
CACHE_TRAIN_LINKS = [
    ("ckpt.VAE", "cache.vae"),
    ("clip.CLIP", "cache.clip"),
    ("cache.cache", "train.cache"),
    ("settings.settings", "train.settings"),
    ("clip.CLIP", "train.clip"),
    ("ckpt.VAE", "train.vae"),
    ("ckpt.MODEL", "train.model"),
    ("train.loss_chart", "chart.images"),
]
PROMPT_LINKS = [("clip.CLIP", "pos.clip"), ("clip.CLIP", "neg.clip")]
COMPARE_LINKS = [  # prompts() -> compare_columns()
    ("pos.CONDITIONING", "compare.positive"),
    ("neg.CONDITIONING", "compare.negative"),
    ("latent.LATENT", "compare.latent_image"),
    ("ckpt.VAE", "compare.vae"),
    ("compare.comparison", "save.images"),
]


def prompts(positive: str, negative: str, size: int = 1024) -> list[Node]:
    return [
        Node("pos", "CLIPTextEncode", {"text": positive}, "Prompt", width=320, height=120),
        Node("neg", "CLIPTextEncode", {"text": negative}, "Negative prompt", width=320, height=100),
        Node("latent", "EmptySD3LatentImage", {"width": size, "height": size}, "Image size", width=320),
    ]


WHERE_FILES_GO = """**Where files go** (under your ComfyUI folder)
- the LoRA: `models/loras/<lora_name>.safetensors` (a taken name gets `_2`, `_3`…); load it later with *LoraLoader*
- checkpoints and validation images: `output/sd35_tuner_runs/<lora_name>/`; tick **resume** on the
  trainer, same `lora_name`, to continue a cancelled run
- the latent cache: `output/sd35_cache/…` (re-running encodes only what changed)"""

MODELS_NEEDED = f"""**Models** (pick yours in the loaders if the names differ)
- `models/checkpoints/{BASE_MODEL}` (SD3.5 Large or Medium; the trainer trains on the MODEL it loads)
- `models/text_encoders/`: `{"`, `".join(TEXT_ENCODERS)}`"""

DATA_STEPS = f"""1. Put your pictures (optional `name.txt` captions next to them) in a folder under
   `ComfyUI/input/` and pick it in **Load Dataset Folder** (`{SAMPLE_FOLDER}` is a placeholder).
2. **Smart Crop** gives each picture an SD3.5 bucket, cropped on faces or the salient region.
3. **Caption Dataset** adds your trigger word (here `{TRIGGER}`); with a model in
   `models/captioners/` it writes missing captions.
4. **Preview Dataset** shows crops and captions: check them before spending GPU time."""


PIPELINE_NOTE = f"""## Photos → SD3.5 LoRA → CFG vs APG
The whole pipeline in one graph; run it group by group (Data → Cache → Train → Compare).

{DATA_STEPS}
5. **Cache** encodes every picture (VAE) and caption (text encoders) once.
6. **Train** streams the loss, validation grids (CFG row over APG row) and progress into the
   trainer node; **Cancel** keeps a checkpoint and the node says how to resume.
7. **Compare** samples the trained model with CFG and APG from the same seed.

{MODELS_NEEDED}

{WHERE_FILES_GO}
- pictures: `output/sd35_tuner_loss_chart_*.png`, `output/sd35_tuner_cfg_vs_apg_*.png`"""

DATASET_NOTE = f"""## Prepare a LoRA dataset
{DATA_STEPS}
5. **Save Dataset** writes the cropped images, `.txt` captions and `dataset.jsonl` to
   `output/<folder>/` (the kohya / SimpleTuner layout); Load Dataset Folder reads it back.

Resolution 512 keeps this quick; use 1024 for SD3.5 training. No model files are needed
unless you caption with a model from `models/captioners/`."""

TRAIN_NOTE = f"""## Train an SD3.5 LoRA, then sample it with APG
1. **Data**: pick your folder under `ComfyUI/input/` in **Load Dataset Folder**
   (`{SAMPLE_FOLDER}` is a placeholder); Smart Crop buckets it.
2. **Cache** encodes pictures and captions once.
3. **Train**: the loss chart and validation grids fill in while it runs; **Cancel** keeps a
   checkpoint. Gradient checkpointing and int8 fit SD3.5 Large on a 24 GB card.
4. **Sample**: the trained MODEL (LoRA applied) through APG and a KSampler.

{MODELS_NEEDED}

{WHERE_FILES_GO}"""

CFG_VS_APG_NOTE = f"""## CFG vs APG on SD3.5
Samples the same seed twice, with classifier-free guidance and with Adaptive Projected
Guidance, and shows them under a split slider (CFG left, APG right) with saturation figures.
APG keeps colours natural at high guidance scales; η, norm threshold and momentum are the
paper's parameters (η=1, r=0, β=0 is exactly CFG).

{MODELS_NEEDED.replace(" (SD3.5 Large or Medium; the trainer trains on the MODEL it loads)", "")}

**Output**: `output/sd35_cfg_vs_apg_*.png` (labelled side by side)."""


def _pipeline() -> Workflow:
    data = load_and_crop(1024, 1.5) + [
        [Node("caption", "SD35TunerCaption", {"trigger": TRIGGER}, width=360)],
        [Node("preview", "SD35TunerPreviewDataset", {"count": 8, "tile": 256}, width=360, height=320)],
    ]
    cache = cache_columns()
    chart = Node("chart", "SaveImage", {"filename_prefix": "sd35_tuner_loss_chart"}, "Save loss chart", width=380)
    train = train_columns(chart)
    compare = [
        prompts(PROMPT, NEGATIVE),
        *compare_columns("sd35_tuner_cfg_vs_apg"),
    ]
    return Workflow(
        PIPELINE,
        PIPELINE_NOTE,
        [
            Group("Data", data, BLUE),
            Group("Cache", cache, GREEN),
            Group("Train", train, YELLOW),
            Group("Compare", compare, PURPLE),
        ],
        [
            ("load.dataset", "crop.dataset"),
            ("crop.dataset", "caption.dataset"),
            ("caption.dataset", "preview.dataset"),
            ("caption.dataset", "cache.dataset"),
            *CACHE_TRAIN_LINKS,
            *PROMPT_LINKS,
            ("train.model", "compare.model"),
            *COMPARE_LINKS,
        ],
    )


def _dataset_prep() -> Workflow:
    data = load_and_crop(512, 2.0) + [
        [Node("caption", "SD35TunerCaption", {"trigger": "sd35sample"}, width=360)],
        [
            Node("preview", "SD35TunerPreviewDataset", {"count": 16, "tile": 256}, width=380, height=360),
            Node("save", "SD35TunerSaveDataset", {"folder": "sd35_tuner_dataset"}, width=380),
        ],
    ]
    return Workflow(
        DATASET_PREP,
        DATASET_NOTE,
        [Group("Data", data, BLUE)],
        [
            ("load.dataset", "crop.dataset"),
            ("crop.dataset", "caption.dataset"),
            ("caption.dataset", "preview.dataset"),
            ("caption.dataset", "save.dataset"),
        ],
    )


def _train() -> Workflow:
    cache = cache_columns()
    train = train_columns(Node("chart", "PreviewImage", title="Loss chart", width=380, height=260))
    sample = [
        [Node("apg", "SD35TunerAPG", APG, "APG", width=320)] + prompts(PROMPT, NEGATIVE),
        [Node("sampler", "KSampler", {"seed": 42, **FIXED_SEED, "steps": 28, "cfg": 5.0, "scheduler": "sgm_uniform"})],
        [Node("decode", "VAEDecode", width=220)],
        [Node("save", "SaveImage", {"filename_prefix": "sd35_tuner_lora"}, width=320, height=300)],
    ]
    return Workflow(
        TRAIN,
        TRAIN_NOTE,
        [
            Group("Data", load_and_crop(1024, 1.5), BLUE),
            Group("Cache", cache, GREEN),
            Group("Train", train, YELLOW),
            Group("Sample", sample, PURPLE),
        ],
        [
            ("load.dataset", "crop.dataset"),
            ("crop.dataset", "cache.dataset"),
            *CACHE_TRAIN_LINKS,
            *PROMPT_LINKS,
            ("train.model", "apg.model"),
            ("apg.model", "sampler.model"),
            ("pos.CONDITIONING", "sampler.positive"),
            ("neg.CONDITIONING", "sampler.negative"),
            ("latent.LATENT", "sampler.latent_image"),
            ("sampler.LATENT", "decode.samples"),
            ("ckpt.VAE", "decode.vae"),
            ("decode.IMAGE", "save.images"),
        ],
    )


def _cfg_vs_apg() -> Workflow:
    models = [[checkpoint_loader(), clip_loader()], [Node("sampling", "ModelSamplingSD3", {"shift": 3.0}, width=260)]]
    return Workflow(
        CFG_VS_APG,
        CFG_VS_APG_NOTE,
        [
            Group("Models", models, GREEN),
            Group(
                "Prompt",
                [
                    prompts(
                        "a red fox sitting in fresh snow at sunrise, vivid colours, detailed fur, photograph",
                        "blurry, low quality",
                    )
                ],
                CYAN,
            ),
            Group(
                "Compare",
                compare_columns("sd35_cfg_vs_apg"),
                PURPLE,
            ),
        ],
        [("ckpt.MODEL", "sampling.model"), ("sampling.MODEL", "compare.model"), *PROMPT_LINKS, *COMPARE_LINKS],
    )


def workflows() -> list[Workflow]:
    return [_pipeline(), _dataset_prep(), _train(), _cfg_vs_apg()]
