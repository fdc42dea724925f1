"""Dataset preparation as a plain library (no ComfyUI import): manifest, image loading, crop, captions."""
