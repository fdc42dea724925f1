"""Let torchvision 0.28 import against CPU torch 2.13 in the test venv.

The only torchvision matching torch 2.13.0 is a CUDA build whose C ops cannot load against
the CPU torch wheel; its two ``register_fake("torchvision::nms"/"qnms")`` decorators then
raise "operator torchvision::nms does not exist" at import. ComfyUI imports torchvision at
start but nothing SD3-related uses those ops, so we make the two decorators conditional on
``torchvision.extension._has_ops()``. Idempotent; dev/test venv only, never a user's install.
"""

import importlib.util
import pathlib

MARK = "# patched by sd35-tuner"
spec = importlib.util.find_spec("torchvision")
assert spec and spec.origin, "torchvision is not installed"
path = pathlib.Path(spec.origin).parent / "_meta_registrations.py"
text = path.read_text()
if MARK not in text:
    helper = (
        "\n\ndef _sd35_tuner_fake(name):\n"
        "    if torchvision.extension._has_ops():\n"
        "        return torch.library.register_fake(name)\n"
        "    return lambda fn: fn\n\n\n"
        f"{MARK}\n"
    )
    anchor = "@functools.lru_cache(None)\ndef get_meta_lib"
    assert anchor in text, f"unexpected torchvision layout in {path}"
    text = text.replace(anchor, helper + "\n" + anchor, 1)
    for op in ("nms", "qnms"):
        text = text.replace(
            f'@torch.library.register_fake("torchvision::{op}")', f'@_sd35_tuner_fake("torchvision::{op}")'
        )
    path.write_text(text)
