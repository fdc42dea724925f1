"""The test harness reads what ComfyUI prints the same way on every version it runs against."""

from __future__ import annotations

from tools.browser import EXPECTED_NOISE, ConsoleError
from tools.comfy_server import ComfyServer

LOG_0_3 = """Import times for custom nodes:
   0.0 seconds: /tmp/base/custom_nodes/websocket_image_save.py
   0.1 seconds (IMPORT FAILED): /tmp/base/custom_nodes/broken
   0.0 seconds: /tmp/base/custom_nodes/sd35-tuner
"""
LOG_0_33 = (
    "\x1b[32m[INFO]\x1b[0m \nImport times for custom nodes:\n"
    "\x1b[32m[INFO]\x1b[0m    0.1 seconds: /tmp/base/custom_nodes/sd35-tuner\n"
    "\x1b[32m[INFO]\x1b[0m    2.5 seconds (IMPORT FAILED): /tmp/base/custom_nodes/broken\n"
)


def test_import_times_are_read_from_both_log_formats(tmp_path):
    server = ComfyServer(tmp_path)
    for log, ours, broken in ((LOG_0_3, 0.0, 0.1), (LOG_0_33, 0.1, 2.5)):
        server.log_path.write_text(log)
        times = server.import_times()
        assert times["/tmp/base/custom_nodes/sd35-tuner"] == (ours, False)
        assert times["/tmp/base/custom_nodes/broken"] == (broken, True)


def _unexpected(error: ConsoleError) -> bool:
    return not any(noise.matches(error) for noise in EXPECTED_NOISE)


def test_core_frontend_noise_is_matched_exactly():
    core = ConsoleError("ComfyApp graph accessed before initialization", "/assets/settingStore-CwkLtSKP.js")
    assert not _unexpected(core)
    # the same words from our extension, another text from core's file, or a longer message all still fail
    assert _unexpected(ConsoleError(core.text, "/extensions/sd35-tuner/train_monitor.js"))
    assert _unexpected(ConsoleError("ComfyApp graph accessed before initialization!", core.url))
    assert _unexpected(ConsoleError("TypeError: x is undefined", core.url))
    missing = "Failed to load resource: the server responded with a status of 404 (Not Found)"
    assert not _unexpected(ConsoleError(missing, "/api/userdata/user.css"))
    assert _unexpected(ConsoleError(missing, "/extensions/sd35-tuner/shared/dom.js"))
    assert _unexpected(ConsoleError(missing, "/api/view?filename=sd35_apg_compare_00001_.png"))


def test_frontend_132_type_error_needs_its_own_stack_frame():
    text = "TypeError: Cannot read properties of undefined (reading 'id')\n    at onChange ({})\n    at Proxy.set (x)"
    vue = "/assets/lib/vue/dist/vue.esm-browser.prod.js"
    core = ConsoleError(text.format("http://127.0.0.1:8188/assets/index-BKdH1OFt.js:58:253162"), vue)
    ours = ConsoleError(text.format("http://127.0.0.1:8188/extensions/sd35-tuner/apg_compare.js:10:5"), vue)
    assert not _unexpected(core)
    assert _unexpected(ours)
