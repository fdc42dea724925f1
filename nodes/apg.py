"""Adaptive Projected Guidance nodes: a MODEL patch, a GUIDER, and a CFG-vs-APG comparison.

Thin wrappers: the math is apg.guidance, the sampler hook apg.patch, the figures and picture apg.compare
(the last two are imported when a node runs: ComfyUI times every pack's import at start).
"""

from __future__ import annotations

import comfy.patcher_extension
import comfy.samplers
from comfy_api.latest import io

from ..apg.schedule import REFERENCE_ELEMENTS, THRESHOLD_MODES, WINDOW_UNITS, GuidanceWindow
from ..apg.settings import MOMENTUM_LIMIT, MOMENTUM_REASON
from ._apg_compare import UI_KEY, sweep_inputs  # noqa: F401  (UI_KEY: the viewer's key)
from ._types import CATEGORY
from ._validation import Choice, range_problems, verdict

CATEGORY_APG = f"{CATEGORY}/sampling"
WRAPPER_KEY = "sd35_tuner_apg"

PAPER = "Sadat, Hilliges & Weber, ICLR 2025 (arXiv 2410.02416), Algorithm 1"


def apg_inputs() -> list[io.Input]:
    return [
        io.Float.Input(
            "eta",
            default=0.0,
            min=-10.0,
            max=10.0,
            step=0.01,
            tooltip="Weight of the guidance part parallel to the conditional prediction (the part that oversaturates). "
            "Default 0 (the paper's choice). 1 keeps it: with norm_threshold 0 and momentum 0 that is plain CFG.",
        ),
        io.Float.Input(
            "norm_threshold",
            default=15.0,
            min=0.0,
            max=1000.0,
            step=0.1,
            tooltip="Clamp the L2 norm of each sample's guidance update to r. Default 15 (the paper's SDXL value). "
            "0 disables the clamp.",
        ),
        Choice(
            "threshold_mode",
            options=list(THRESHOLD_MODES),
            default="scaled",
            tooltip="'scaled' (default): r is given for a 4x128x128 latent (SDXL at 1024px, "
            f"{REFERENCE_ELEMENTS} values) and scaled by sqrt(latent values / {REFERENCE_ELEMENTS}), so one r "
            "works at any resolution and channel count. 'absolute': r bounds the raw norm, as in the paper.",
        ),
        io.Float.Input(
            "momentum",
            default=-0.5,
            min=-MOMENTUM_LIMIT,
            max=MOMENTUM_LIMIT,
            step=0.01,
            tooltip="beta in m <- delta + beta*m across steps; negative is the paper's reverse momentum. "
            "Default -0.5 (the paper's SDXL value). 0 disables momentum. Resets at the start of every run. "
            + MOMENTUM_REASON,
        ),
        io.Float.Input(
            "window_start",
            default=0.0,
            min=0.0,
            max=1.0,
            step=0.01,
            tooltip="Where APG starts acting, as a fraction of the run (0 = first step); plain CFG before. "
            "Default 0. With window_end 1 the window covers the whole run (no window).",
        ),
        io.Float.Input(
            "window_end",
            default=1.0,
            min=0.0,
            max=1.0,
            step=0.01,
            tooltip="Where APG stops acting, as a fraction of the run (1 = the end); plain CFG after. "
            "Default 1. Must not be below window_start.",
        ),
        Choice(
            "window_unit",
            options=list(WINDOW_UNITS),
            default="steps",
            tooltip="How the window fractions are read. 'steps' (default): step index / number of steps. "
            "'sigma': through the model's noise schedule, like start/end percents in core nodes, so the "
            "window is a fixed sigma range whatever the step count. No effect when the window is 0 to 1.",
        ),
    ]


def settings_from(
    eta: float,
    norm_threshold: float,
    threshold_mode: str,
    momentum: float,
    window_start: float,
    window_end: float,
    window_unit: str,
):
    from ..apg.patch import APGSettings

    return APGSettings(
        eta=eta,
        norm_threshold=norm_threshold,
        threshold_mode=threshold_mode,
        momentum=momentum,
        window=GuidanceWindow(window_start, window_end, window_unit),
    )


def check_apg(node: type[io.ComfyNode], window_start: float | None, window_end: float | None, **values) -> bool | str:
    """validate_inputs of every APG node: the widgets' ranges, then the library's one check of the APG settings
    (``apg.settings``: finite values, bounded momentum, guidance scale) and of the window's order."""
    from ..apg.settings import check_apg as apg_problems
    from ..apg.settings import check_scale

    problems = range_problems(node, **values, window_start=window_start, window_end=window_end)
    scale = values.pop("cfg", None)
    found = {**apg_problems(**values), **({"cfg": check_scale(scale)} if scale is not None else {})}
    problems |= {name: text for name, text in found.items() if text and name not in problems}
    try:
        _ = problems or None in (window_start, window_end) or GuidanceWindow(window_start, window_end)
    except ValueError as err:
        problems["window_start"] = str(err)
    return verdict(problems)


def patch_model(model, settings):
    """A clone of ``model`` whose CFG step is APG (``settings``: apg.patch.APGSettings), momentum scoped to each run."""
    from ..apg.patch import APGPatch

    patch = APGPatch(settings)
    patched = model.clone()
    patched.set_model_sampler_cfg_function(patch.cfg_function)
    patched.remove_wrappers_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, WRAPPER_KEY)
    patched.add_wrapper_with_key(
        comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, WRAPPER_KEY, patch.outer_sample_wrapper
    )
    return patched


class SD35TunerAPG(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SD35TunerAPG",
            display_name="Adaptive Projected Guidance (paper)",
            category=CATEGORY_APG,
            description="Patches a MODEL so every sampler (KSampler, KSamplerAdvanced, SamplerCustom) guides with "
            f"APG ({PAPER}) on the denoised predictions, using the sampler's own cfg as the scale w: "
            "D = D_cond + (w-1)(delta_orth + eta*delta_par). Reduces the oversaturation of high cfg. "
            "cfg = 1 is unguided (no-op); cfg < 1 samples with plain CFG. Unlike core's Adaptive Projected Guidance "
            "it uses the paper's w - 1 convention (core's cfg w acts like ours at w + 1), works on the denoised "
            "(x0) predictions as the paper does, and resets its momentum at the start of every sampling run.",
            inputs=[io.Model.Input("model", tooltip="The model to sample with APG.")] + apg_inputs(),
            outputs=[
                io.Model.Output(
                    display_name="model",
                    tooltip="A clone of the model with APG installed; the input model is untouched.",
                )
            ],
        )

    @classmethod
    def validate_inputs(
        cls, eta: float, norm_threshold: float, momentum: float, window_start: float, window_end: float
    ) -> bool | str:
        return check_apg(cls, window_start, window_end, eta=eta, norm_threshold=norm_threshold, momentum=momentum)

    @classmethod
    def execute(cls, model, **kwargs) -> io.NodeOutput:
        return io.NodeOutput(patch_model(model, settings_from(**kwargs)))


class SD35TunerAPGGuider(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SD35TunerAPGGuider",
            display_name="APG Guider",
            category=CATEGORY_APG,
            description=f"A GUIDER for SamplerCustomAdvanced that guides with APG ({PAPER}) at scale cfg.",
            inputs=[
                io.Model.Input("model"),
                io.Conditioning.Input("positive"),
                io.Conditioning.Input("negative"),
                io.Float.Input(
                    "cfg",
                    default=5.0,
                    min=1.0,
                    max=100.0,
                    step=0.1,
                    round=0.01,
                    tooltip="Guidance scale w. Default 5. 1 disables guidance (the negative is not evaluated).",
                ),
            ]
            + apg_inputs(),
            outputs=[
                io.Guider.Output(
                    display_name="guider",
                    tooltip="A GUIDER for SamplerCustomAdvanced that samples with APG at scale cfg.",
                )
            ],
        )

    @classmethod
    def validate_inputs(
        cls, cfg: float, eta: float, norm_threshold: float, momentum: float, window_start: float, window_end: float
    ) -> bool | str:
        apg = {"eta": eta, "norm_threshold": norm_threshold, "momentum": momentum}
        return check_apg(cls, window_start, window_end, cfg=cfg, **apg)

    @classmethod
    def execute(cls, model, positive, negative, cfg: float, **kwargs) -> io.NodeOutput:
        guider = comfy.samplers.CFGGuider(patch_model(model, settings_from(**kwargs)))
        guider.set_conds(positive, negative)
        guider.set_cfg(cfg)
        return io.NodeOutput(guider)


class SD35TunerCompareCFGAPG(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SD35TunerCompareCFGAPG",
            display_name="Compare CFG vs APG",
            category=CATEGORY_APG,
            description="Samples the same model, conditioning, seed, steps and sampler twice, with plain CFG and "
            "with APG at the same cfg, decodes both and shows them side by side with their settings, plus "
            "mean saturation and brightness of each and the APG/CFG ratios. With sweep_scales it samples both "
            "at several scales instead (a grid: rows CFG and APG, columns w) and reports the size of the guidance "
            "update each applied, so pairs of equal effective strength can be compared.",
            inputs=[
                io.Model.Input("model"),
                io.Conditioning.Input("positive"),
                io.Conditioning.Input("negative"),
                io.Latent.Input("latent_image", tooltip="The latent to denoise (e.g. EmptySD3LatentImage)."),
                io.Vae.Input("vae", tooltip="Decodes both samples."),
                io.Int.Input(
                    "seed",
                    default=0,
                    min=0,
                    max=0xFFFFFFFFFFFFFFFF,
                    control_after_generate=True,
                    tooltip="Noise seed, shared by both runs. Default 0.",
                ),
                io.Int.Input("steps", default=28, min=1, max=10000, tooltip="Sampling steps of each run. Default 28."),
                io.Float.Input(
                    "cfg",
                    default=7.0,
                    min=1.0,
                    max=100.0,
                    step=0.1,
                    round=0.01,
                    tooltip="Guidance scale w of both runs. Default 7 (high, where CFG oversaturates). "
                    "1 disables guidance, so both halves are the same.",
                ),
                Choice(
                    "sampler_name",
                    options=comfy.samplers.KSampler.SAMPLERS,
                    default="euler",
                    tooltip="Sampler of both runs, as in KSampler. Default euler.",
                ),
                Choice(
                    "scheduler",
                    options=comfy.samplers.KSampler.SCHEDULERS,
                    default="sgm_uniform",
                    tooltip="Noise schedule of both runs, as in KSampler. Default sgm_uniform (SD3's).",
                ),
                io.Float.Input(
                    "denoise",
                    default=1.0,
                    min=0.0,
                    max=1.0,
                    step=0.01,
                    tooltip="Share of the schedule to run. Default 1 (from pure noise).",
                ),
            ]
            + apg_inputs()
            + sweep_inputs(),
            outputs=[
                io.Image.Output(
                    "comparison",
                    display_name="comparison",
                    tooltip="CFG (left) and APG (right) with their settings as captions; after a sweep, the grid "
                    "(rows CFG and APG, one column per scale, each picture under its figures).",
                ),
                io.String.Output(
                    "figures",
                    display_name="figures",
                    tooltip="Mean saturation, brightness and applied guidance update per image with APG/CFG ratios; "
                    "after a sweep, a table per scale and the pairs of equal update size.",
                ),
                io.Image.Output(
                    "cfg_image",
                    display_name="cfg_image",
                    tooltip="The CFG sample alone (after a sweep: one per scale).",
                ),
                io.Image.Output(
                    "apg_image",
                    display_name="apg_image",
                    tooltip="The APG sample alone (after a sweep: one per scale).",
                ),
            ],
            is_output_node=True,
        )

    @classmethod
    def validate_inputs(
        cls,
        cfg: float,
        eta: float,
        norm_threshold: float,
        momentum: float,
        window_start: float,
        window_end: float,
        sweep_scales: str | None = None,
    ) -> bool | str:
        apg = {"eta": eta, "norm_threshold": norm_threshold, "momentum": momentum}
        found = check_apg(cls, window_start, window_end, cfg=cfg, **apg)
        problems = [] if found is True else [found]
        if sweep_scales and sweep_scales.strip():  # empty: the single pair
            from ..apg.sweep import parse_scales

            try:
                parse_scales(sweep_scales)
            except ValueError as err:
                problems.append(str(err))
        return verdict(problems)

    @classmethod
    def execute(
        cls,
        model,
        positive,
        negative,
        latent_image,
        vae,
        seed,
        steps,
        cfg,
        sampler_name,
        scheduler,
        denoise,
        sweep_scales: str = "",
        **kwargs,
    ) -> io.NodeOutput:
        from ._apg_compare import metered_sampler, pair, sweep

        settings = settings_from(**kwargs)
        apg_model = patch_model(model, settings)
        sample = metered_sampler(vae, seed, steps, sampler_name, scheduler, positive, negative, latent_image, denoise)
        run = f"{sampler_name}/{scheduler}, {steps} steps, seed {seed}"
        if sweep_scales.strip():
            return sweep(cls, sample, model, apg_model, settings, sweep_scales, run)
        return pair(cls, sample, model, apg_model, settings, cfg, run)
