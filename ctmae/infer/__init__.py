"""Running a trained MAE over whole scans: sliding windows, reconstruct (masked-voxel PSNR against trivial fills) and
embed (per-scan and per-token features) with their output files."""
