"""The CFG-vs-APG viewer after a sweep, in the real frontend: scale pickers appear, start on the pair of
equal guidance strength, and switching them shows other pictures."""

from __future__ import annotations

import json
import math

from tools.browser import frontend
from tools.builtin import point_at_builtin_models
from tools.workflow_api import set_inputs, ui_to_api
from tools.workflow_specs import CFG_VS_APG, bundled

WORKFLOW = bundled(CFG_VS_APG)
NODE = "SD35TunerCompareCFGAPG"
VIEWER = ".sd35-apg-compare"
CENTER_ON_NODE = """(type) => {
    const node = window.app.graph._nodes.find((n) => n.type === type);
    window.app.canvas.centerOnNode(node);
    window.app.canvas.setDirty(true, true);
}"""


def picker_state(ui) -> dict:
    return ui.page.evaluate(
        """(sel) => {
            const root = document.querySelector(sel);
            const picker = root.querySelector('.sd35-apg-sweep');
            const options = (cls) => [...picker.querySelectorAll(cls + ' option')].map((o) => o.textContent);
            return {shown: picker.style.display, loaded: root.dataset.loaded,
                    cfgScales: options('.sd35-apg-sweep-cfg'), apgScales: options('.sd35-apg-sweep-apg'),
                    cfg: picker.querySelector('.sd35-apg-sweep-cfg').value,
                    apg: picker.querySelector('.sd35-apg-sweep-apg').value,
                    cfgSrc: root.querySelector('.sd35-apg-cfg').src, apgSrc: root.querySelector('.sd35-apg-apg').src,
                    caption: root.querySelector('.sd35-apg-caption').textContent};
        }""",
        VIEWER,
    )


def test_sweep_pickers_start_on_equal_strength_and_switch_pictures(comfy, tmp_path):
    workflow = json.loads(WORKFLOW.read_text())
    with frontend(comfy) as ui:
        assert ui.load_workflow(workflow, WORKFLOW.name) == []
        assert picker_state(ui)["shown"] == "none"  # no sweep yet: no pickers

        prompt = point_at_builtin_models(ui_to_api(workflow, comfy.object_info()), size=64, demo=True)
        set_inputs(prompt, NODE, steps=4, sweep_scales="1.5, 4, 9")
        set_inputs(prompt, "SaveImage", filename_prefix="apg_sweep_browser_test")
        client_id = ui.page.evaluate("() => window.comfyAPI.api.api.clientId")
        prompt_id = comfy.post("/prompt", {"prompt": prompt, "client_id": client_id})["prompt_id"]
        entry = comfy.wait(prompt_id)
        assert entry["status"]["status_str"] == "success"
        ui.page.wait_for_function(f"() => document.querySelector('{VIEWER}').dataset.loaded === '1'", timeout=180_000)

        result = entry["outputs"][next(k for k, v in prompt.items() if v["class_type"] == NODE)]["sd35_apg_compare"][0]
        cells = result["cells"]
        cfg_cells = [c for c in cells if c["guidance"] == "CFG"]
        apg_cells = [c for c in cells if c["guidance"] == "APG"]
        target = cfg_cells[-1]["update"]
        matched = min(range(len(apg_cells)), key=lambda i: abs(math.log(apg_cells[i]["update"] / target)))
        s = picker_state(ui)
        assert s["shown"] == "flex" and s["cfgScales"] == ["1.5", "4", "9"] == s["apgScales"]
        assert s["cfg"] == "2" and s["apg"] == str(matched)  # strongest CFG vs the APG of equal update
        assert result["cfg"][2]["filename"] in s["cfgSrc"] and result["apg"][matched]["filename"] in s["apgSrc"]
        assert "left: CFG w=9" in s["caption"] and "equal effective strength" in s["caption"]
        ui.screenshot(tmp_path / "apg_sweep_page.png")
        ui.page.evaluate(CENTER_ON_NODE, NODE)
        ui.page.wait_for_timeout(300)  # the DOM widget follows the canvas on the next frame
        ui.page.locator(VIEWER).screenshot(path=str(tmp_path / "apg_sweep_viewer.png"))

        other = (matched + 1) % 3
        ui.page.select_option(f"{VIEWER} .sd35-apg-sweep-apg", str(other))
        ui.page.wait_for_function(f"() => document.querySelector('{VIEWER}').dataset.loaded === '1'", timeout=60_000)
        s = picker_state(ui)
        assert result["apg"][other]["filename"] in s["apgSrc"]
        assert f"right: APG w={apg_cells[other]['scale']:g}" in s["caption"]
        assert ui.unexpected_errors() == []
