"""Reports from run directories: Markdown tables and PNG figures (``lmdistill report RUN_DIR... -o DIR``).

A report reads only what runs leave on disk (:mod:`lmdistill.rundir`): ``config.yaml`` (the
resolved config), ``metrics.jsonl`` (training log with cumulative ``flops`` and the held-out
``eval_*`` numbers), ``eval.json`` (``lmdistill eval``) and ``train_summary.json``. So any run can
be compared with any other, wherever it was trained.

- :mod:`.runs`: reading a run directory into a :class:`~.runs.Run`;
- :mod:`.groups`: seeds of one setting grouped into a :class:`~.groups.Row`, tasks, labels, the teacher's rows;
- :mod:`.tables`: the Markdown tables (mean ± std over seeds);
- :mod:`.plots`: curves against cumulative training FLOPs (matplotlib);
- :mod:`.write`: :func:`~.write.write_report`, which puts them together in report.md;
- :mod:`.summary`: :func:`~.summary.write_summary`, the numbers as summary.json (mean and 95 % CI over seeds).
"""

from lmdistill.report.groups import Row, organize
from lmdistill.report.plots import curve
from lmdistill.report.runs import ReportError, Run, find_runs, load_run
from lmdistill.report.summary import summarize, write_summary
from lmdistill.report.write import Report, write_report

__all__ = ["Report", "ReportError", "Row", "Run", "curve", "find_runs", "load_run", "organize", "summarize", "write_report", "write_summary"]
