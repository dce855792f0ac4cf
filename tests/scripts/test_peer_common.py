"""scripts/peers/_common.py: the Meter gives the keys bench_quality reads from every peer's result.

The Meter runs in a fresh child process, as in a peer script: inside a long-lived pytest process, malloc
may hand an allocation pages that are already resident and ``ru_maxrss`` is already past any small
allocation, so RSS growth could not be seen there.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

KEYS = {  # what gptqmodel_gptq.py / llmcompressor_gptq.py write by hand
    "quant_seconds",
    "quant_cpu_seconds",
    "loadavg_1min_before_after",
    "load_seconds",
    "save_seconds",
    "rss_start_bytes",
    "rss_imports_bytes",
    "rss_after_load_bytes",
    "peak_rss_after_load_bytes",
    "peak_rss_bytes",
}

BLOB = 64 << 20  # held past the load phase

CHILD = f"""
import json, sys, time
sys.path.insert(0, {str(REPO / "scripts" / "peers")!r})
from _common import Meter
meter = Meter()
meter.imported()
with meter.phase("load"):
    blob = b"\\x01" * {BLOB}  # every page written, so it is resident
with meter.phase("quant"):
    t0 = time.process_time()
    while time.process_time() - t0 < 0.05:  # CPU work the quant phase must count
        pass
with meter.phase("save"):
    time.sleep(0.01)
print(json.dumps(meter.fields()))
"""


def test_meter_notes_every_phase() -> None:
    out = subprocess.run(
        [sys.executable, "-c", CHILD], capture_output=True, text=True, check=True, timeout=60
    )
    fields = json.loads(out.stdout)
    assert set(fields) == KEYS
    assert (
        fields["quant_cpu_seconds"] >= 0.04 and fields["quant_seconds"] >= fields["quant_cpu_seconds"] * 0.5
    )
    assert fields["save_seconds"] >= 0.01
    assert fields["rss_after_load_bytes"] >= fields["rss_start_bytes"] + BLOB // 2
    # ru_maxrss and VmRSS count slightly differently: compare the peaks with each other and with the start
    assert (
        fields["peak_rss_bytes"]
        >= fields["peak_rss_after_load_bytes"]
        >= fields["rss_start_bytes"] + BLOB // 2
    )
    assert len(fields["loadavg_1min_before_after"]) == 2
