"""Stage preprocess: head crop, CLAHE, sharpening, and the cached image array."""
