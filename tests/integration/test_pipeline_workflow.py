"""The main job's story through a real server: the pipeline workflow teaches the demo base a held-out subject.

Seeded end to end. "Closer to the subject" is PSNR to the nearest of its four training views: the
LoRA's picture for the trigger prompt must gain at least 3 dB over the base's, from the same seed.
"""

from __future__ import annotations

import numpy as np
from PIL import Image
from safetensors import safe_open

from tools import demo_samples, main_job

TEST_STEPS = 400  # the main job trains 1200 steps; 400 (batches of 4) already show the subject


def test_pipeline_lora_brings_the_trigger_prompt_closer_to_the_held_out_subject(comfy):
    run = main_job.run_pipeline(comfy, steps=TEST_STEPS, lora_name="pipeline_story_lora")
    assert run.lora == "pipeline_story_lora.safetensors"
    with safe_open(str(comfy.base_dir / "models" / "loras" / run.lora), "pt") as lora:
        assert lora.metadata()["sd35_tuner.steps"] == str(TEST_STEPS)
    saved = {
        run.prompt[node]["inputs"]["filename_prefix"]: comfy.output_files(run.entry, node)
        for node in run.prompt
        if run.prompt[node]["class_type"] == "SaveImage"
    }
    [chart] = next(files for prefix, files in saved.items() if "loss" in prefix)
    [sweep] = next(files for prefix, files in saved.items() if "apg" in prefix)
    assert np.asarray(Image.open(chart)).std() > 0
    assert Image.open(sweep).size[0] == 4 * demo_samples.SIZE + 3 * 4  # the sweep's four scales side by side

    views = demo_samples.subject_views()
    base, _ = demo_samples.sample(comfy, run.trigger_prompt)
    trained, _ = demo_samples.sample(comfy, run.trigger_prompt, lora=run.lora)
    base_psnr, trained_psnr = demo_samples.closeness(base, views), demo_samples.closeness(trained, views)
    assert trained_psnr >= base_psnr + 3.0, f"base {base_psnr:.2f} dB, LoRA {trained_psnr:.2f} dB"
