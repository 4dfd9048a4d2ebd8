"""Stage evaluate: metrics with bootstrap intervals, calibration, figures, the report."""
