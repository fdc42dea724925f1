"""Issue 11 cases 6 and 7 through the real server: planted links and names that would hide files.

Written from the attacker's side: a link planted in a dataset folder or at the trainer's work folder,
a LoRA named '.'. Each asserts nothing outside ComfyUI's folders changed, a message naming the entry,
and a later good run.
"""

from __future__ import annotations

import copy
import json
import urllib.error
import uuid

from PIL import Image

from tests.cache_checks import neighbourhood
from tests.integration.test_train_node import _node, base_prompt  # noqa: F401
from tools.comfy_server import execution_error
from tools.sample_data import photo


def _victims(comfy):
    victims = comfy.base_dir / "victims"
    victims.mkdir(exist_ok=True)
    return victims


def _refusal(comfy, prompt: dict) -> str:
    """What ComfyUI says when it refuses a prompt: at validation (node_errors; the other output nodes of the
    graph may still run) or at execution."""
    try:
        answer = comfy.post("/prompt", {"prompt": prompt, "client_id": comfy.client_id})
    except urllib.error.HTTPError as err:
        return json.dumps(json.loads(err.read()).get("node_errors"))
    error = execution_error(comfy.wait(answer["prompt_id"], timeout=600))
    if answer.get("node_errors"):
        return json.dumps(answer["node_errors"])
    return error["exception_message"] if error else "(ran without an error)"


def test_an_image_link_leading_outside_comfyui_folders_is_skipped_and_never_copied(comfy):
    tag = uuid.uuid4().hex[:6]
    victims = _victims(comfy)
    Image.fromarray(photo("coffee")).resize((256, 192)).save(victims / f"secret_{tag}.png")
    folder = comfy.base_dir / "input" / f"links_{tag}"
    folder.mkdir()
    Image.fromarray(photo("astronaut")).resize((256, 256)).save(folder / "good.png")
    (folder / "link.png").symlink_to(victims / f"secret_{tag}.png")
    before = neighbourhood(victims, victims / "none")
    info = comfy.object_info()
    prompt = {
        "1": _node(info, "SD35TunerLoadDataset", folder=folder.name),
        "2": _node(info, "SD35TunerSmartCrop", dataset=["1", 0], resolution=256),
        "3": _node(info, "SD35TunerSaveDataset", dataset=["2", 0], folder=f"saved_{tag}"),
    }
    entry = comfy.run(prompt)
    report = entry["outputs"]["1"]["text"][0]
    assert "1 image(s)" in report and f"{folder / 'link.png'}: a link to" in report and "outside the allowed" in report
    saved = sorted(p.name for p in (comfy.base_dir / "output" / f"saved_{tag}").iterdir())
    assert saved == ["dataset.jsonl", "good.png", "good.txt"]
    assert neighbourhood(victims, victims / "none") == before


def test_a_link_planted_at_the_work_folder_is_refused_and_nothing_is_written_through_it(comfy, base_prompt):  # noqa: F811
    name = f"planted_{uuid.uuid4().hex[:6]}"
    target = _victims(comfy) / name
    target.mkdir()
    runs = comfy.base_dir / "output" / "sd35_tuner_runs"
    runs.mkdir(exist_ok=True)
    (runs / name).symlink_to(target, target_is_directory=True)
    prompt = copy.deepcopy(base_prompt)
    prompt["8"]["inputs"].update({"lora_name": name, "steps": 2})
    message = _refusal(comfy, prompt)
    assert f"run folder 'sd35_tuner_runs/{name}' resolves to {target}, outside" in message, message
    assert list(target.iterdir()) == []
    assert not (comfy.base_dir / "models" / "loras" / f"{name}.safetensors").exists()
    (runs / name).unlink()
    comfy.run(prompt, timeout=600)  # the later good run
    assert (comfy.base_dir / "models" / "loras" / f"{name}.safetensors").is_file()
    assert (runs / name).is_dir() and not (runs / name).is_symlink() and list(target.iterdir()) == []


def test_a_lora_named_dot_is_refused_before_running(comfy, base_prompt):  # noqa: F811
    prompt = copy.deepcopy(base_prompt)
    prompt["8"]["inputs"]["lora_name"] = "."
    assert "no part starting with '.'" in _refusal(comfy, prompt)
    assert not list((comfy.base_dir / "models" / "loras").glob(".*safetensors"))
