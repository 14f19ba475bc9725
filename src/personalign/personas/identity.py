"""Identity of a model + tokenizer, so a fitted profile refuses a model it was not fitted with.

``steer_identity`` records the architecture, a 16-value probe of the input embedding table and a
fingerprint of the tokenizer (vocabulary, special tokens, chat template); ``check_identity``
compares a stored record with a live model and says which part differs.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

import torch

__all__ = ["tokenizer_fingerprint", "steer_identity", "check_identity", "compare_identity"]


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """sha256 (16 hex) of the vocabulary, the special tokens and the chat template."""
    blob = json.dumps([sorted(tokenizer.get_vocab().items()), list(tokenizer.all_special_tokens),
                       getattr(tokenizer, "chat_template", None) or ""])
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def steer_identity(model: Any, tokenizer: Any, name: str | None = None) -> dict[str, Any]:
    """What identifies the steering model: architecture, an embedding probe, the tokenizer."""
    cfg = model.config
    emb = model.get_input_embeddings().weight.detach()
    idx = torch.arange(16, dtype=torch.long) * (emb.numel() - 1) // 15  # integer math: exact for large tables
    probe = emb.reshape(-1)[idx.to(emb.device)].float().cpu().tolist()
    return {
        "name": name or getattr(cfg, "_name_or_path", "") or type(model).__name__,
        "architecture": {k: getattr(cfg, k, None) for k in
                         ("model_type", "hidden_size", "num_hidden_layers", "vocab_size")},
        "embedding_probe": [round(x, 6) for x in probe],
        "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
    }


def check_identity(stored: Mapping[str, Any], model: Any, tokenizer: Any, what: str = "profile") -> None:
    """``ValueError`` unless ``model``/``tokenizer`` are the ones ``stored`` was computed with."""
    compare_identity(stored, steer_identity(model, tokenizer), what)


def compare_identity(stored: Mapping[str, Any], now: Mapping[str, Any], what: str = "profile") -> None:
    """``check_identity`` against an identity already computed (``steer_identity``): a server checks
    every profile against its steering model's identity, computed once."""
    problems = []
    if stored.get("tokenizer_fingerprint") != now["tokenizer_fingerprint"]:
        problems.append("its tokenizer differs")
    if stored.get("architecture") != now["architecture"]:
        problems.append(f"architecture {stored.get('architecture')} != {now['architecture']}")
    elif not torch.allclose(torch.tensor(stored.get("embedding_probe", [])), torch.tensor(now["embedding_probe"]),
                            rtol=1e-2, atol=1e-3):
        problems.append("its weights differ")
    if problems:
        raise ValueError(
            f"{what} was fitted with steering model {stored.get('name')!r}, but the given model "
            f"{now['name']!r} is different ({'; '.join(problems)}); refit the profile with this model "
            "or pass the model it was fitted with."
        )
