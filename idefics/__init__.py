"""IDEFICS vision-language models in plain PyTorch.

    import idefics
    pipe = idefics.load("path/to/checkpoint", dtype="bfloat16")   # no path: the embedded idefics-mini
    inputs = pipe.processor(prompts)
    logits = pipe.model(**inputs).logits
    texts = pipe.generate(prompts, max_new_tokens=50)
"""

from .config import IdeficsConfig
from .model import Idefics
from .pipeline import Generation, Pipeline, load

__all__ = ["Generation", "Idefics", "IdeficsConfig", "Pipeline", "load"]
__version__ = "0.1.0"
