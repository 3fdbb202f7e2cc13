"""minitorch-infer: run Llama-family models on the CPU by compiling them into a graph, executed with NumPy.

    import minitorch_infer
    m = minitorch_infer.load("story")
    print(m.generate("Once upon a time", max_new_tokens=32, greedy=True).text)
"""

from .errors import (ContextOverflowError, GraphError, KVCacheFullError, MinitorchError, ModelFormatError,
                     ModelNotFoundError, OutputExistsError, PromptError, SamplingError, TemplateError, TraceError,
                     UnsupportedModelError)
from .loading import load
from .model import Model

__all__ = ["load", "Model", "MinitorchError", "ModelFormatError", "UnsupportedModelError", "ModelNotFoundError",
           "TraceError", "GraphError", "ContextOverflowError", "KVCacheFullError", "SamplingError", "TemplateError",
           "PromptError", "OutputExistsError"]
