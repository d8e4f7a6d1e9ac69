"""The report stage moved to `eksft_pipeline/analysis/stage.py` (one function per report section); this
module keeps the old import path working."""

from eksft_pipeline.analysis.stage import (  # noqa: F401
    Report,
    ReportStage,
    drift_precision_lines,
    iou_table,
    stage_lines,
)
