"""One self-contained HTML report for a run directory (``visionkit report RUN_DIR``).

Example::

    from visionkit.report import build_report
    path = build_report("runs/lenet-digits-1")   # runs/lenet-digits-1/report.html, plots in runs/.../report/
"""
from .build import build_report

__all__ = ["build_report"]
