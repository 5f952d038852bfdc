"""Recall against COCO ground truth, its plots, and tuning the inference defaults. Imports viz and below; not training or export."""
