"""Evaluation: metrics with bootstrap intervals (metrics), calibration, operating points stored with the
model (operating_point), figures (plots), reports (report), Grad-CAM (gradcam), and the evaluate,
predict and card commands."""
