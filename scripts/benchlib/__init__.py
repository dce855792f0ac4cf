"""The quality benchmark's parts (``scripts/bench_quality.py`` is the driver).

- ``runs``: the runs of the table (``RunSpec``) and the child process that quantizes one of them;
- ``evaluation``: loading the saved checkpoints and scoring every model with
  ``llmquant.evaluate.evaluate_models``, per-window results kept in ``eval_windows.jsonl``;
- ``report``: the rows of ``results.json``, the Markdown table and the Quality section of the docs;
- ``util``: files, JSON, the code version and the machine.

The peers' virtualenvs and commands live in ``scripts/peers/venvs.py``. Import these with ``scripts/``
on ``sys.path`` (the driver puts it there).
"""
