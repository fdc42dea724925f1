"""APG as a ComfyUI sampler patch, written against the hook's argument dict so it needs no ComfyUI import.

ComfyUI calls ``model_options["sampler_cfg_function"](args)`` once per model evaluation with, among others,
``cond_denoised``/``uncond_denoised`` (the x0 predictions), ``input`` (x), ``cond_scale`` (the sampler's CFG
value, our w) and ``sigma``, and expects ``x − D`` back. Popular APG packs project onto ``args["cond"]``,
which is ``x − D_cond``: the wrong vector. We use the denoised predictions, as the paper does.

Momentum belongs to one sampling run. :meth:`APGPatch.outer_sample_wrapper` is installed as ComfyUI's
OUTER_SAMPLE wrapper (it encloses every ``CFGGuider.sample``, whichever sampler node started it) and resets
the state before and after each run, also when the run is cancelled; :class:`MomentumState` additionally
forgets itself on a shape, batch or dtype change. A run split over two KSamplerAdvanced nodes is two runs:
momentum restarts at the second one.

Documented no-ops: at w = 1 ComfyUI skips the unconditional pass, and we return the conditional prediction
(what plain sampling does). At w < 1 APG is undefined (it would push toward the negative prompt through a
projection meant for the other direction), so we fall back to plain CFG at w and log it once per run.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

from torch import Tensor

from .guidance import MomentumState, apply_apg, cfg
from .settings import APGSettings, check_scale

__all__ = ["APGPatch", "APGSettings"]

logger = logging.getLogger(__name__)


class APGPatch:
    """One installed APG patch: its settings and the momentum of the run in progress."""

    def __init__(self, settings: APGSettings) -> None:
        self.settings = settings
        self.state = MomentumState(settings.momentum)
        self._warned_low_scale = False

    def __copy__(self) -> APGPatch:
        return self

    def __deepcopy__(self, memo: dict[int, Any]) -> APGPatch:
        # ModelPatcher.clone() deep-copies model_options, and with it our bound cfg_function. A copy would
        # hold its own momentum that the OUTER_SAMPLE wrapper (copied by reference) never resets, so every
        # clone of a patched model (a LoRA loader, ModelSamplingSD3 after APG) must share this one patch.
        return self

    def reset(self) -> None:
        self.state.reset()
        self._warned_low_scale = False

    def outer_sample_wrapper(self, executor: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        self.reset()
        try:
            return executor(*args, **kwargs)
        finally:
            self.reset()

    def _active(self, args: dict[str, Any]) -> bool:
        window = self.settings.window
        if window.whole_run:
            return True
        sigma = float(args["sigma"].reshape(-1)[0])
        options = args.get("model_options") or {}
        sample_sigmas = options.get("transformer_options", {}).get("sample_sigmas")
        schedule = None if sample_sigmas is None else [float(s) for s in sample_sigmas]
        model_sampling = getattr(args.get("model"), "model_sampling", None)
        percent_to_sigma = getattr(model_sampling, "percent_to_sigma", None)
        return window.active(sigma, schedule, percent_to_sigma)

    def guided(self, args: dict[str, Any]) -> Tensor:
        """The guided denoised prediction D for one model evaluation."""
        cond: Tensor = args["cond_denoised"]
        uncond: Tensor | None = args.get("uncond_denoised")
        scale = float(args["cond_scale"])
        if problem := check_scale(scale):
            raise ValueError(problem)
        if uncond is None or args.get("input_uncond", uncond) is None or math.isclose(scale, 1.0):
            return cond
        if scale < 1.0:
            if not self._warned_low_scale:
                logger.warning("APG needs cfg >= 1; cfg=%g samples with plain CFG instead", scale)
                self._warned_low_scale = True
            return cfg(cond, uncond, scale)
        if not self._active(args):
            return cfg(cond, uncond, scale)
        s = self.settings
        r = s.threshold_for(cond[0])
        return apply_apg(cond, uncond, scale, eta=s.eta, norm_threshold=r, state=self.state)

    def cfg_function(self, args: dict[str, Any]) -> Tensor:
        """ComfyUI's ``sampler_cfg_function``: returns ``x − D``."""
        return args["input"] - self.guided(args)
