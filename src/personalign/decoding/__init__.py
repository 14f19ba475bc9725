"""Decoding: the method contract (``decoding.method``), THE loop (``decoding.loop``), the sampler and
the stopping rules.

``generate``/``stream``/``decode`` live in ``personalign.decoding.loop`` (exported at top level as
``personalign.generate``); methods build on ``decoding.method`` and ``decoding.sampling``.
"""

from personalign.decoding.sampling import SamplingConfig, SamplingParams, sample

__all__ = ["SamplingConfig", "SamplingParams", "sample"]
