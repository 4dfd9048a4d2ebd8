"""Stage split: leak-free train/val/test assignment, and reading the split back for the later stages."""
