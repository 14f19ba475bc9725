"""P-DPO / P-RM checkpoints: a directory that a fresh process can load onto the same base model.

Layout::

    DIR/config.json            format, objective, training config, base-model identity, metrics, environment
    DIR/adapter/               the LoRA adapter (PEFT ``save_pretrained``)
    DIR/user_model.json        user-model config;  DIR/user_model.safetensors  its parameters
    DIR/users.json             the user-id index (external id -> row; row 0 = unknown user)
    DIR/value_head.safetensors reward models with a soft-prompt head only

Loading checks that the given base model is the one the checkpoint was trained on (model type,
shape and a SHA-256 fingerprint of the input embeddings) and raises ``ValueError`` otherwise.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from peft import PeftModel
from safetensors.torch import load_file, save_file
from torch import nn

from personalign.environment import environment_record
from personalign.training.pdpo.model import check_base_identity
from personalign.training.user_model import UserIndex, UserModel, load_user_model, save_user_model

__all__ = ["CHECKPOINT_FORMAT", "LoadedCheckpoint", "save_checkpoint", "read_checkpoint_config", "load_checkpoint"]

CHECKPOINT_FORMAT = "personalign-pdpo/1"


@dataclass
class LoadedCheckpoint:
    """A checkpoint on its base model: ``lm`` carries the adapter (merged into the weights if asked)."""

    lm: Any
    users: UserModel
    index: UserIndex
    config: dict[str, Any]
    value_head: Any = None


def save_checkpoint(
    directory: str | Path,
    *,
    lm: Any,
    users: UserModel,
    index: UserIndex,
    objective: str,
    train_config: dict[str, Any],
    base: dict[str, Any],
    metrics: dict[str, Any] | None = None,
    value_head: Any = None,
) -> Path:
    """Write the checkpoint (module docstring) and return its directory."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    lm.save_pretrained(str(d / "adapter"))
    save_user_model(users, d)
    index.save(d / "users.json")
    if value_head is not None:
        save_file({k: v.detach().cpu().contiguous() for k, v in value_head.state_dict().items()},
                  str(d / "value_head.safetensors"))
    record = {
        "format": CHECKPOINT_FORMAT,
        "objective": objective,
        "train": train_config,
        "base_model": base,
        "metrics": metrics or {},
        "environment": environment_record(),
    }
    peft_config = getattr(lm, "peft_config", {}).get("default")
    if peft_config is not None:  # the modules the adapter covers (resolved per architecture, training.lora)
        record["lora_targets"] = sorted(peft_config.target_modules)
    (d / "config.json").write_text(json.dumps(record, indent=1, default=str))
    return d


def read_checkpoint_config(directory: str | Path) -> dict[str, Any]:
    d = Path(directory)
    path = d / "config.json"
    if not path.is_file():
        raise ValueError(f"`checkpoint` {str(d)!r} is not a P-DPO checkpoint (no config.json).")
    record = json.loads(path.read_text())
    if record.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"`checkpoint` {str(d)!r} has format {record.get('format')!r}, expected {CHECKPOINT_FORMAT!r}.")
    return record


def load_checkpoint(directory: str | Path, model: Any, *, name: str | None = None, merge: bool = False) -> LoadedCheckpoint:
    """Load the checkpoint at ``directory`` onto ``model`` (its base model, modified in place).

    Args:
        directory: the checkpoint directory.
        model: the base causal LM.
        name: how the base model was named (for error messages only).
        merge: merge the LoRA weights into ``model`` (fast generation) instead of keeping the adapter.
    """

    d = Path(directory)
    record = read_checkpoint_config(d)
    check_base_identity(record["base_model"], model, name, str(d))
    if not (d / "adapter").is_dir():
        raise ValueError(f"`checkpoint` {str(d)!r} holds no adapter/ directory.")
    with warnings.catch_warnings():  # PEFT calls a transformers method deprecated in v5
        warnings.filterwarnings("ignore", category=FutureWarning)
        lm = PeftModel.from_pretrained(model, str(d / "adapter"))
    if merge:
        lm = lm.merge_and_unload()
    lm.eval()
    dev = next(model.parameters()).device
    users = load_user_model(d).to(dev).eval()
    head = None
    if (d / "value_head.safetensors").is_file():
        state = load_file(str(d / "value_head.safetensors"))
        head = nn.Linear(state["weight"].shape[1], 1)
        head.load_state_dict(state)
        head.to(dev).eval()
    return LoadedCheckpoint(lm=lm, users=users, index=UserIndex.load(d / "users.json"), config=record,
                            value_head=head)

