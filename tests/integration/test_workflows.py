"""Every bundled workflow is served as a template and names only node types the server has."""

from __future__ import annotations

import json

import pytest

from tools import paths
from tools.comfy_server import PACK_DIR_NAME
from tools.workflow_api import ui_to_api

WORKFLOWS = sorted(paths.WORKFLOWS.glob("*.json"))


def test_bundled_workflows_are_listed_as_templates(comfy):
    templates = comfy.get("/api/workflow_templates")
    assert sorted(templates.get(PACK_DIR_NAME, [])) == sorted(p.stem for p in WORKFLOWS)


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_bundled_workflow_converts_against_the_live_node_list(comfy, path):
    workflow = json.loads(path.read_text())
    prompt = ui_to_api(workflow, comfy.object_info())
    assert prompt, f"{path.name} has no executable nodes"
