"""personalign: align a language model's output with one person's preferences at decoding time.

The public API is small: name what the methods need, build a backend with it attached, build a
method, decode.

    >>> from personalign import Request, Resources, build_backend, build_method, generate
    >>> res = Resources(model="smollm2")
    >>> backend = build_backend(res, ["preference_prompting"])
    >>> method = build_method("preference_prompting", {}, backend, res)
    >>> out = generate(method, [Request(prompt="Explain DNS.", preference="concise")], backend)

A method that needs trained parts names them in ``Resources`` (``persrm=``, ``pdpo_checkpoint=``,
``steer_model=``, ``reward_model=``); ``personalign.assembly`` says what each one attaches.
"""

from personalign import methods as _methods  # noqa: F401  (registers the built-in methods)
from personalign.assembly import Resources, build_backend, build_method
from personalign.decoding.loop import TextDelta, generate, stream
from personalign.decoding.sampling import SamplingConfig
from personalign.environment import __version__
from personalign.methods import METHODS, Method, TokenMethod, get_method, method_names
from personalign.types import GenerationOutput, Request, StepOutput, ViewSpec
from personalign.views import HFBackend, LoadedModel, load_model

__all__ = [
    "GenerationOutput",
    "HFBackend",
    "LoadedModel",
    "METHODS",
    "Method",
    "Request",
    "Resources",
    "SamplingConfig",
    "StepOutput",
    "TextDelta",
    "TokenMethod",
    "ViewSpec",
    "build_backend",
    "build_method",
    "generate",
    "get_method",
    "load_model",
    "method_names",
    "stream",
    "__version__",
]
