"""``chatos-retrain report``: one self-contained HTML page an operator looks at instead of reading logs.

:mod:`daemon.report.data` gathers what the page shows from state (the repositories and each job's
``metrics.jsonl``; no SQL, no plotting); :mod:`daemon.report.page` draws the plots with matplotlib (SVG, inline)
and writes the page. Only the CLI's ``report`` verb imports ``page``, and only when it runs: matplotlib stays out
of the service's import path (an optional extra, ``pip install 'chatos-retrain[report]'``).
"""
