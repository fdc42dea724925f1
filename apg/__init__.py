"""Adaptive Projected Guidance (Sadat, Hilliges & Weber, ICLR 2025): pure torch, no ComfyUI import."""
