"""Evaluation: metrics with bootstrap intervals (metrics), calibration, operating points (operating_point),
figures (plots), reports and model cards (report, card), heatmaps (gradcam), and scoring a checkpoint
on a dataset (evaluate) or on image files (predict)."""
