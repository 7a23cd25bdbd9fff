"""Data: the in-memory image set, built-in datasets, splits and user-upload formats (numpy only, no torch)."""

from .imageset import ImageSet, stratified_split

__all__ = ["ImageSet", "stratified_split"]
