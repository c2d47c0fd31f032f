"""A self-contained HTML report of explanations: one file that opens offline and can be sent to a colleague.

>>> import camkit
>>> from camkit.report import build_records, write_report, ReportOptions
>>> loaded = camkit.load_model()
>>> records = build_records(loaded, [("cat", camkit.sample_image())], methods=["gradcam", "layercam"])
>>> write_report(records, "report.html", ReportOptions(title="cats")).bytes_per_image

:func:`build_records` explains images with a model; any other source of maps (a stored run) only has to make
:class:`ImageRecord` objects. :func:`write_report` writes them one at a time.
"""

from camkit.report.html import ReportOptions, ReportStats, check_record, record_json, render, write_report
from camkit.report.records import (
    FUSED,
    METRICS,
    OWN_MAP,
    ImageRecord,
    MapEntry,
    Prediction,
    build_records,
    top_predictions,
)

__all__ = [
    "FUSED",
    "METRICS",
    "OWN_MAP",
    "ImageRecord",
    "MapEntry",
    "Prediction",
    "ReportOptions",
    "ReportStats",
    "build_records",
    "check_record",
    "record_json",
    "render",
    "top_predictions",
    "write_report",
]
