"""Handing a trained encoder to others: export (safetensors, MONAI bundle), the model card, loading an export or
checkpoint back into MONAI's ViT/UNETR, and ``ctmae info``."""
