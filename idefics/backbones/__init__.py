"""Real pretrained backbones that install offline: SmolLM2-135M (GGUF) and EfficientNet-Lite0."""

from idefics.backbones.efficientnet import EfficientNetLite0, efficientnet_preprocess, load_efficientnet_lite0
from idefics.backbones.gguf_llama import GGUFLlama, find_smollm2_gguf, load_gguf_llama, save_tokenizer_files

__all__ = [
    "EfficientNetLite0",
    "GGUFLlama",
    "efficientnet_preprocess",
    "find_smollm2_gguf",
    "load_efficientnet_lite0",
    "load_gguf_llama",
    "save_tokenizer_files",
]
