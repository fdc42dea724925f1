"""The live loss chart (web/js/train_monitor.js) in the real frontend: it sits in the trainer node of the
bundled workflow, fills from the progress events of a real run queued by this page's client, and ends
with the run's full loss list."""

from __future__ import annotations

import json
from pathlib import Path

from tests.integration.test_train_workflow import WORKFLOW, ci_prompt
from tools.browser import frontend

NODE = "SD35TunerTrainLora"
MONITOR = ".sd35-train-monitor"


def test_loss_chart_streams_a_real_run(comfy, tmp_path):
    workflow = json.loads(Path(WORKFLOW).read_text())
    with frontend(comfy) as ui:
        assert ui.load_workflow(workflow, WORKFLOW.name) == []
        has_widget = ui.page.evaluate(
            "(type) => window.app.graph.nodes.find((n) => n.type === type).widgets.some((w) => w.name === 'loss_chart')",
            NODE,
        )
        assert has_widget and ui.page.locator(MONITOR).count() == 1

        prompt = ci_prompt(comfy, "monitor_lora")
        prompt[next(k for k, v in prompt.items() if v["class_type"] == NODE)]["inputs"]["steps"] = 6
        client_id = ui.page.evaluate("() => window.comfyAPI.api.api.clientId")
        prompt_id = comfy.post("/prompt", {"prompt": prompt, "client_id": client_id})["prompt_id"]
        entry = comfy.wait(prompt_id, timeout=900)
        assert entry["status"]["status_str"] == "success"
        ui.page.wait_for_function(
            f"() => document.querySelector('{MONITOR} .sd35-train-status').textContent.startsWith('done')",
            timeout=60_000,
        )
        state = ui.page.evaluate(
            """(sel) => {
                const root = document.querySelector(sel);
                return {points: Number(root.dataset.points), events: Number(root.dataset.events),
                        status: root.querySelector('.sd35-train-status').textContent};
            }""",
            MONITOR,
        )
        ui.screenshot(tmp_path / "train_monitor.png")
        assert state["events"] >= 1  # streamed while running, to this client
        assert state["points"] == 6 and "monitor_lora.safetensors" in state["status"]
        assert not ui.unexpected_errors()
