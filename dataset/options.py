"""The dataset nodes' choices, in a module light enough for ComfyUI to import at start.

Node schemas need these lists when ComfyUI registers the pack; the modules that use them
(crop, captions, folder, save) import them from here, so there is one definition.
"""

MODES = ("face_then_saliency", "saliency", "centre", "none")
TOO_SMALL = ("skip", "keep", "error")
POLICIES = ("fill_missing", "overwrite", "prepend")
CAPTION_EXTENSIONS = (".txt", ".caption")
FORMATS = {"png": ("PNG", {}), "jpg": ("JPEG", {"quality": 95}), "webp": ("WEBP", {"quality": 95})}
