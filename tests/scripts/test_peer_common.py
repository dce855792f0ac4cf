"""scripts/peers/_common.py: the Meter gives the keys bench_quality reads from every peer's result."""

from __future__ import annotations

import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO / "scripts" / "peers") not in sys.path:
    sys.path.insert(0, str(REPO / "scripts" / "peers"))

from _common import Meter  # noqa: E402

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


def test_meter_notes_every_phase() -> None:
    meter = Meter()
    meter.imported()
    with meter.phase("load"):
        blob = bytearray(8 << 20)  # 8 MiB held past the load phase
    with meter.phase("quant"):
        t0 = time.process_time()
        while time.process_time() - t0 < 0.05:  # CPU work the quant phase must count
            pass
    with meter.phase("save"):
        time.sleep(0.01)
    fields = meter.fields()
    assert set(fields) == KEYS
    assert (
        fields["quant_cpu_seconds"] >= 0.04 and fields["quant_seconds"] >= fields["quant_cpu_seconds"] * 0.5
    )
    assert fields["save_seconds"] >= 0.01
    assert fields["rss_after_load_bytes"] >= fields["rss_start_bytes"] + len(blob) // 2
    # ru_maxrss and VmRSS count slightly differently: compare the peaks with each other and with the start
    assert (
        fields["peak_rss_bytes"]
        >= fields["peak_rss_after_load_bytes"]
        >= fields["rss_start_bytes"] + len(blob) // 2
    )
    assert len(fields["loadavg_1min_before_after"]) == 2
