"""Segmentation from the pretrained encoder: config, labelled data, UNETR, fine-tuning loop, prediction."""
