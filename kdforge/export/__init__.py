"""Weight exports for downstream code: torchvision key names, Detectron2 ``.pkl``."""
from kdforge.export.detectron2 import (detectron2_resnet_key, load_detectron2_pkl, save_detectron2_pkl,
                                       to_detectron2)
from kdforge.export.torchvision import detect_layout, to_torchvision_state_dict, torchvision_backbone

__all__ = ["to_torchvision_state_dict", "torchvision_backbone", "detect_layout", "detectron2_resnet_key",
           "to_detectron2", "save_detectron2_pkl", "load_detectron2_pkl"]
