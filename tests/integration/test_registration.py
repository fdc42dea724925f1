from __future__ import annotations

import re


def test_pack_imports_without_failure_and_fast(comfy):
    log = comfy.log()
    assert "sd35-tuner" in log
    assert "IMPORT FAILED" not in "\n".join(line for line in log.splitlines() if "sd35-tuner" in line)
    match = re.search(r"^\s*([0-9.]+) seconds(?: \(IMPORT FAILED\))?: .*custom_nodes/sd35-tuner\s*$", log, re.M)
    assert match, "ComfyUI did not report an import time for the pack"
    assert float(match.group(1)) <= 0.05


def test_every_widget_input_of_our_nodes_has_a_tooltip(comfy):
    widgets = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
    missing = []
    for node_id, info in comfy.object_info().items():
        if not node_id.startswith("SD35Tuner"):
            continue
        for section in ("required", "optional"):
            for name, spec in info["input"].get(section, {}).items():
                options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
                if (isinstance(spec[0], list) or spec[0] in widgets) and not options.get("tooltip"):
                    missing.append(f"{node_id}.{name}")
    assert missing == []


def test_every_node_of_the_pack_is_registered(comfy):
    expected = {
        "SD35TunerLoadDataset",
        "SD35TunerSmartCrop",
        "SD35TunerCaption",
        "SD35TunerImagesToDataset",
        "SD35TunerPreviewDataset",
        "SD35TunerSaveDataset",
        "SD35TunerCacheLatents",
        "SD35TunerTrainSettings",
        "SD35TunerTrainLora",
        "SD35TunerAPG",
        "SD35TunerAPGGuider",
        "SD35TunerCompareCFGAPG",
    }
    assert {node_id for node_id in comfy.object_info() if node_id.startswith("SD35Tuner")} == expected
