"""Idefics2 (`model_type: "idefics2"`): SigLIP + connector + Mistral, image tokens in the text sequence.

`idefics.load(folder)` picks it from `config.json`; the classes are importable for direct use:

    from idefics.idefics2 import Idefics2, Idefics2Config, Idefics2Processor
"""

from .config import Idefics2Config, Idefics2PerceiverConfig, Idefics2VisionConfig, MistralConfig
from .model import Idefics2
from .processor import Idefics2ImageSettings, Idefics2Processor

__all__ = ["Idefics2", "Idefics2Config", "Idefics2ImageSettings", "Idefics2PerceiverConfig", "Idefics2Processor",
           "Idefics2VisionConfig", "MistralConfig"]
