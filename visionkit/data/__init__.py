"""Data: sources (folders, CSV files, built-ins), image validation, splits and deterministic loaders."""
from .builtins import BUILTINS, data_root, make_fake, read_idx
from .datasets import ImageFiles, TensorImages, load_rgb, to_rgb
from .errors import DataError
from .loaders import FileLoader, Loader, TensorLoader, class_weights, make_loader, mix_seed, sample_weights
from .sources import DataBundle, build_data, list_datasets, stratified_split
from .validate import check_image, validate_images

__all__ = ["BUILTINS", "DataBundle", "DataError", "FileLoader", "ImageFiles", "Loader", "TensorImages", "TensorLoader",
           "build_data", "check_image", "class_weights", "data_root", "list_datasets", "load_rgb", "make_fake",
           "make_loader", "mix_seed", "read_idx", "sample_weights", "stratified_split", "to_rgb", "validate_images"]
