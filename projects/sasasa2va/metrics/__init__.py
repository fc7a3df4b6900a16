"""J (region IoU), F (boundary F-measure) and J&F for referring video object segmentation."""
from .jf import (
    aggregate,
    boundary_map,
    boundary_radius,
    db_eval_boundary,
    db_eval_iou,
    evaluate_split,
    format_summary_line,
    jf_from_masks,
    prepare_gt,
    score_prepared,
)

__all__ = [
    "aggregate", "boundary_map", "boundary_radius", "db_eval_boundary", "db_eval_iou", "evaluate_split",
    "format_summary_line", "jf_from_masks", "prepare_gt", "score_prepared",
]
