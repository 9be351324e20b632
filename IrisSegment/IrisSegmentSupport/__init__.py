"""Helpers of the Slicer module that need neither Slicer nor torch (dependency checks, sample data)."""
