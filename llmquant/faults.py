"""Named kill points: the reliability suite's seam for ``kill -9`` at an exact moment of a run.

``LLMQUANT_KILL_AT=NAME[:N]`` makes the process SIGKILL itself the N-th time (default: the first) it
reaches the point ``NAME``; ``*`` matches every point, so ``*:17`` is the 17th point reached, whatever it
is. The process dies exactly as under ``kill -9``: no ``finally`` block, no exception handler, no atexit
hook runs. ``LLMQUANT_KILL_TRACE=FILE`` appends the name of every point reached to FILE, one a line (the
suite reads an uninterrupted run's trace to choose where to kill). With neither variable set (always,
outside the tests) a point costs two environment lookups.

Points (where the run is when it reaches them):

- ``capture.batch``: a calibration batch's layer-0 inputs were captured;
- ``layer.loaded``, ``layer.transformed`` (AWQ), ``gptq.group`` (one GPTQ group of a layer rounded),
  ``layer.rounded``, ``layer.propagated``: inside one decoder layer, in that order;
- ``resume.layer``, ``resume.activations``, ``resume.state``: the layer's resume files written, one by one;
- ``save.packed`` (one module packed), ``save.shard`` (one safetensors shard written), ``save.json`` (one
  JSON file written), ``save.verified`` (the temporary directory read back), ``save.swapped`` (the
  output renamed into place), ``save.resume_dropped`` (the resume state invalidated, its files not yet
  deleted): while writing a checkpoint (quantize and convert).
"""

from __future__ import annotations

import os
import signal

KILL_AT = "LLMQUANT_KILL_AT"
KILL_TRACE = "LLMQUANT_KILL_TRACE"

_reached: dict[str, int] = {}


def kill_point(name: str) -> None:
    """Record reaching point ``name``; SIGKILL this process if ``LLMQUANT_KILL_AT`` names it (see above)."""
    spec, trace = os.environ.get(KILL_AT), os.environ.get(KILL_TRACE)
    if not spec and not trace:
        return
    if trace:
        with open(trace, "a", encoding="utf-8") as f:
            f.write(name + "\n")
    if spec:
        target, _, nth = spec.partition(":")
        if target in (name, "*"):
            _reached[target] = _reached.get(target, 0) + 1
            if _reached[target] == int(nth or 1):
                os.kill(os.getpid(), signal.SIGKILL)
