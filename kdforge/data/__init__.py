"""Datasets, transforms, samplers and converters."""
from kdforge.data.datasets import ImageFolderDataset, ImageListDataset, UnlabeledFolder, scan_image_folder
from kdforge.data.transforms import MultiView, build_eval_transform, build_train_transform

__all__ = ["ImageFolderDataset", "ImageListDataset", "UnlabeledFolder", "scan_image_folder",
           "MultiView", "build_eval_transform", "build_train_transform"]
