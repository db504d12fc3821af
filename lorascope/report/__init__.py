"""The LoRA paper's analysis section (Hu et al. 2021, §7 and Appendix H) as a report.

::

    from lorascope.report import build_report
    report = build_report(["a_r8", "a_r64", "a_r64_seed1"], "base_model_dir", out_dir="out")
    print(report.summary())

writes Figure 3/4/6/7/8 analogues, Table 7, spectra and effective ranks (PNG + PDF figures;
Markdown, CSV and LaTeX tables), every number in ``results.h5`` and the page with captions
twice, ``index.md`` and a self-contained ``index.html``. Everything goes through the public
analysis API (:mod:`lorascope.analysis`).
"""

from lorascope.report.build import Report, build_report
from lorascope.report.compute import ReportData, ReportOptions, compute_report
from lorascope.report.inputs import Member, group_adapters, sample_inputs, sample_tracking

__all__ = [
    "Member",
    "Report",
    "ReportData",
    "ReportOptions",
    "build_report",
    "compute_report",
    "group_adapters",
    "sample_inputs",
    "sample_tracking",
]
