"""SD3.5 Tuner: ComfyUI nodes from a folder of pictures to an SD3.5 LoRA and APG-guided samples.

ComfyUI imports every pack at start, so this file imports nothing heavy: it names the
frontend folder and hands ComfyUI an entrypoint that imports the node modules on call.
"""

WEB_DIRECTORY = "./web/js"


async def comfy_entrypoint():
    from .nodes import SD35TunerExtension

    return SD35TunerExtension()
