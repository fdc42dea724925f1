from __future__ import annotations

from tools.comfy_server import PACK_DIR_NAME


def test_pack_imports_without_failure(comfy):
    """ComfyUI lists the pack among the custom nodes it imported, without IMPORT FAILED (its speed: bench_import)."""
    times = comfy.import_times()
    pack = str(comfy.base_dir / "custom_nodes" / PACK_DIR_NAME)
    assert pack in times, f"ComfyUI reported no import of the pack; it reported {times}"
    assert times[pack][1] is False, f"ComfyUI reported IMPORT FAILED for the pack:\n{comfy.log()[-4000:]}"
    ours = [n for n in comfy.object_info() if n.startswith("SD35Tuner")]
    assert len(ours) >= 12, ours


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
