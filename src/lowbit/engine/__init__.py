"""The engine: block-by-block calibration in bounded memory, resumable (see ``runner``)."""
