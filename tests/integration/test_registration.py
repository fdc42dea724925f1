from __future__ import annotations

import re


def test_pack_imports_without_failure_and_fast(comfy):
    log = comfy.log()
    assert "sd35-tuner" in log
    assert "IMPORT FAILED" not in "\n".join(line for line in log.splitlines() if "sd35-tuner" in line)
    match = re.search(r"^\s*([0-9.]+) seconds(?: \(IMPORT FAILED\))?: .*custom_nodes/sd35-tuner\s*$", log, re.M)
    assert match, "ComfyUI did not report an import time for the pack"
    assert float(match.group(1)) <= 0.05
