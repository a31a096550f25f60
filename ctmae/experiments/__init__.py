"""Measuring what pretraining learned: evaluate (few-shot, frozen probe, reconstruction), study (a grid of
corruptions and mask ratios), mask-check, and the in-training monitor."""
