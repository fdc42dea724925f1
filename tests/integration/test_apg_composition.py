"""APG composes with core's SkipLayerGuidanceSD3 and CFGZeroStar on one MODEL, in either order.

ComfyUI runs a MODEL's ``sampler_cfg_function`` (APG's) and then its ``sampler_post_cfg_function`` list
(SLG adds a skip-layer term, CFG-Zero* a term scaled by its optimised alpha), whichever node patched
first. One Euler step from sigma_max to 0 returns the guided denoised prediction D itself, so each
sampler below saves D. The hand check of that step: each core method adds a term that does not depend
on how CFG was combined, so ``D(APG + method) = D(APG) + (D(CFG + method) - D(CFG))``; and since
process_out is affine and those coefficients sum to one, it holds in the saved latent space too.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from tests.integration.test_apg_nodes import WINDOW, apg_node, base_graph

CFG = 12.0  # the guidance term of the tiny random model is small next to D: a high scale makes each effect clear
APG = {"eta": 0.0, "norm_threshold": 0.02, "threshold_mode": "absolute", "momentum": 0.0}  # no parallel part, clamped
CORE = {
    "slg": {
        "class_type": "SkipLayerGuidanceSD3",
        "inputs": {"layers": "1", "scale": 3.0, "start_percent": 0.0, "end_percent": 1.0},
    },
    "zero": {"class_type": "CFGZeroStar", "inputs": {}},
}


def _patched(graph: dict, name: str, chain: list[str]) -> str:
    """Apply ``chain`` (APG and core methods, in order) to the tiny SD3 MODEL; return the last node's id."""
    model = "msd3"
    for i, step in enumerate(chain):
        node = f"{name}_{i}"
        if step == "apg":
            graph[node] = apg_node(APG, WINDOW, model=model)
        else:
            graph[node] = {
                "class_type": CORE[step]["class_type"],
                "inputs": {"model": [model, 0], **CORE[step]["inputs"]},
            }
        model = node
    return model


def _one_step(graph: dict, name: str, model: str) -> None:
    graph[f"{name}_sigmas"] = {
        "class_type": "BasicScheduler",
        "inputs": {"model": [model, 0], "scheduler": "sgm_uniform", "steps": 1, "denoise": 1.0},
    }
    graph[f"{name}_sample"] = {
        "class_type": "SamplerCustom",
        "inputs": {
            "model": [model, 0],
            "add_noise": True,
            "noise_seed": 11,
            "cfg": CFG,
            "positive": ["pos", 0],
            "negative": ["neg", 0],
            "sampler": ["euler", 0],
            "sigmas": [f"{name}_sigmas", 0],
            "latent_image": ["latent", 0],
        },
    }
    graph[f"{name}_save"] = {
        "class_type": "SaveLatent",
        "inputs": {"samples": [f"{name}_sample", 0], "filename_prefix": f"apg_compose/{name}"},
    }


@pytest.fixture(scope="module")
def denoised(comfy) -> dict[str, torch.Tensor]:
    """D after one step for CFG alone, APG alone, each core method alone, and APG with each method both ways."""
    chains = {"cfg": [], "apg": ["apg"]}
    for method in CORE:
        chains |= {method: [method], f"apg_{method}": ["apg", method], f"{method}_apg": [method, "apg"]}
    graph = {**base_graph(32, 32), "euler": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}}}
    for name, chain in chains.items():
        _one_step(graph, name, _patched(graph, name, chain))
    entry = comfy.run(graph)
    out = {}
    for name in chains:
        (path,) = comfy.output_files(entry, f"{name}_save", kind="latents")
        out[name] = load_file(str(path))["latent_tensor"].double()
    return out


def _scale(d: dict[str, torch.Tensor]) -> float:
    return float(d["cfg"].abs().max())


@pytest.mark.parametrize("method", list(CORE))
@pytest.mark.parametrize("order", ["apg_{}", "{}_apg"])
def test_apg_and_a_core_method_compose_as_the_hand_checked_step_says(denoised, method, order):
    d, tol = denoised, 2e-6 * _scale(denoised)  # float32 rounding of D, a few ulps
    both = d[order.format(method)]
    expected = d["apg"] + (d[method] - d["cfg"])
    assert (both - expected).abs().max() <= tol
    # each effect still applies: the method's term and APG's change are both in the combination
    assert (both - d["apg"]).abs().max() > 50 * tol and (both - d[method]).abs().max() > 50 * tol
    assert (d[method] - d["cfg"]).abs().max() > 50 * tol and (d["apg"] - d["cfg"]).abs().max() > 50 * tol


@pytest.mark.parametrize("method", list(CORE))
def test_the_order_of_the_nodes_does_not_matter(denoised, method):
    torch.testing.assert_close(
        denoised[f"apg_{method}"], denoised[f"{method}_apg"], rtol=0, atol=1e-6 * _scale(denoised)
    )
