"""Answers a person can trust: calibration (temperature), the "not sure" threshold and the "not a kana"
(out-of-distribution) threshold, fitted on validation and measured on the test split and non-kana images."""
