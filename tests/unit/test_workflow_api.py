from __future__ import annotations

import pytest

from tools.workflow_api import WorkflowError, set_inputs, ui_to_api, upstream

OBJECT_INFO = {
    "Loader": {"input": {"required": {"name": [["a.safetensors", "b.safetensors"], {}]}}},
    "Sampler": {
        "input": {
            "required": {
                "model": ["MODEL"],
                "seed": ["INT", {"default": 0, "control_after_generate": True}],
                "steps": ["INT", {"default": 20}],
                "cfg": ["FLOAT", {"default": 7.0}],
            },
            "optional": {"note": ["STRING", {}]},
        }
    },
}


def _workflow(nodes, links):
    return {"nodes": nodes, "links": links, "version": 0.4}


def test_widgets_map_in_declared_order_skipping_the_seed_control_value():
    wf = _workflow(
        [
            {"id": 1, "type": "Loader", "widgets_values": ["b.safetensors"], "inputs": []},
            {
                "id": 2,
                "type": "Sampler",
                "widgets_values": [42, "randomize", 9, 4.5, "hi"],
                "inputs": [{"name": "model", "link": 7}],
            },
        ],
        [[7, 1, 0, 2, 0, "MODEL"]],
    )
    prompt = ui_to_api(wf, OBJECT_INFO)
    assert prompt["1"]["inputs"] == {"name": "b.safetensors"}
    assert prompt["2"]["inputs"] == {"seed": 42, "steps": 9, "cfg": 4.5, "note": "hi", "model": ["1", 0]}


def test_a_seed_without_control_widget_has_no_control_value():
    info = {"Trainer": {"input": {"required": {"seed": ["INT", {"control_after_generate": False}], "steps": ["INT"]}}}}
    wf = _workflow([{"id": 1, "type": "Trainer", "widgets_values": [7, 30], "inputs": []}], [])
    assert ui_to_api(wf, info)["1"]["inputs"] == {"seed": 7, "steps": 30}


def test_reroutes_dissolve_and_notes_and_muted_nodes_drop():
    wf = _workflow(
        [
            {"id": 1, "type": "Loader", "widgets_values": ["a.safetensors"]},
            {"id": 3, "type": "Reroute", "inputs": [{"name": "", "link": 1}]},
            {"id": 4, "type": "Note", "widgets_values": ["text"]},
            {"id": 5, "type": "Loader", "mode": 2, "widgets_values": ["a.safetensors"]},
            {
                "id": 2,
                "type": "Sampler",
                "widgets_values": [1, "fixed", 2, 3.0],
                "inputs": [{"name": "model", "link": 2}],
            },
        ],
        [[1, 1, 0, 3, 0, "*"], [2, 3, 0, 2, 0, "MODEL"]],
    )
    prompt = ui_to_api(wf, OBJECT_INFO)
    assert set(prompt) == {"1", "2"}
    assert prompt["2"]["inputs"]["model"] == ["1", 0]


def test_a_widget_converted_to_an_input_takes_the_link_not_the_stored_value():
    wf = _workflow(
        [
            {"id": 1, "type": "Loader", "widgets_values": ["a.safetensors"]},
            {
                "id": 9,
                "type": "Sampler",
                "widgets_values": [5, "fixed", 2, 3.0],
                "inputs": [{"name": "model", "link": 1}],
            },
            {
                "id": 2,
                "type": "Sampler",
                "widgets_values": [1, "fixed", 2, 3.0],
                "inputs": [{"name": "model", "link": 2}, {"name": "steps", "widget": {"name": "steps"}, "link": 3}],
            },
        ],
        [[2, 1, 0, 2, 0, "MODEL"], [3, 9, 0, 2, 1, "INT"], [1, 1, 0, 9, 0, "MODEL"]],
    )
    prompt = ui_to_api(wf, OBJECT_INFO)
    assert prompt["2"]["inputs"]["steps"] == ["9", 0]
    assert prompt["2"]["inputs"]["cfg"] == 3.0


def test_unknown_node_types_are_named():
    wf = _workflow([{"id": 1, "type": "Missing", "widgets_values": []}], [])
    with pytest.raises(WorkflowError, match="'Missing' is not installed"):
        ui_to_api(wf, OBJECT_INFO)


def test_set_inputs_overrides_every_node_of_a_type():
    prompt = {"1": {"class_type": "Loader", "inputs": {"name": "a"}}, "2": {"class_type": "X", "inputs": {}}}
    assert set_inputs(prompt, "Loader", name="b") == 1
    assert prompt["1"]["inputs"]["name"] == "b"


def test_upstream_keeps_the_named_nodes_and_all_that_feed_them():
    prompt = {
        "1": {"class_type": "Loader", "inputs": {"name": "a.safetensors"}},
        "2": {"class_type": "Sampler", "inputs": {"model": ["1", 0], "seed": 0, "steps": 20, "cfg": 7.0}},
        "3": {"class_type": "Sampler", "inputs": {"model": ["2", 0], "seed": 1, "steps": 20, "cfg": 7.0}},
        "4": {"class_type": "Loader", "inputs": {"name": "b.safetensors"}},
    }
    assert upstream(prompt, ["2"]) == {k: prompt[k] for k in ("1", "2")}
    assert set(upstream(prompt, ["3", "4"])) == {"1", "2", "3", "4"}
    assert upstream(prompt, ["1"]) == {"1": prompt["1"]}
