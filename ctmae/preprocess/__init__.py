"""From a scan to training data: MONAI transforms, the SimpleITK resampler, the on-disk cache, the visit schedule."""
