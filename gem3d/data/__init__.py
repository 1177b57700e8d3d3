"""Data: NIfTI I/O, dataset layouts, preprocessing, training windows, demo cohort and phantoms."""
