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


def test_every_output_of_our_nodes_has_a_name_and_a_tooltip(comfy):
    unnamed = []
    for node_id, info in comfy.object_info().items():
        if node_id.startswith("SD35Tuner"):
            tooltips = info.get("output_tooltips") or [None] * len(info["output"])
            for kind, name, tooltip in zip(info["output"], info["output_name"], tooltips, strict=True):
                if not name or name == kind or not tooltip:
                    unnamed.append(f"{node_id}.{name or kind}")
    assert unnamed == []


def test_our_display_names_reach_the_frontend_translations_without_the_pack_suffix(comfy):
    node_defs = comfy.get("/i18n")["en"]["nodeDefs"]
    ours = {k: v["display_name"] for k, v in comfy.object_info().items() if k.startswith("SD35Tuner")}
    assert {k: node_defs[k]["display_name"] for k in ours} == ours  # locales/en/nodeDefs.json is up to date
    assert not [name for name in ours.values() if "SD3.5 Tuner" in name]
    assert ours["SD35TunerAPG"] != comfy.object_info()["APG"]["display_name"]  # not confused with core's APG
