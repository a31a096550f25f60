"""Reading and writing volumes (NIfTI, NRRD/MHA, DICOM series) and finding them on disk: the owner of geometry."""
