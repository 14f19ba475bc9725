"""PersRM, the personalized reward model of PAD (seed 000, Sections 3.2 and 3.4, Eq. 4, 9, 10).

One backbone holds both policies of the reward: π_ref is the frozen backbone, π_θ the same
backbone with a LoRA adapter (PEFT), so they share base weights in memory; π_ref log-probs are
computed with the adapter disabled. A value head maps a preference text p to w_p.

Shapes (our concrete reading of Eq. 4, ``d = D`` = the backbone's hidden size, as the paper's head
"with an output dimension of 4096" on Llama-3-8B):

* the backbone's next-token logit is a sum over hidden dimensions, ``z(a|s) = Σ_i h_i(s) W_{a,i}``
  (``h`` = input of the output head, ``W`` = its weight, untouched by LoRA). We read the paper's
  feature vector ``log π̂(a|s) ∈ R^d`` as that sum split per dimension, with the log-partition spread
  evenly: ``log π̂_i(a|s) = h_i(s) W_{a,i} − log Z(s)/d``, so ``1ᵀ log π̂(a|s) = log π(a|s)``;
* ``φ(s, a) = log π̂_θ(a|s) − log π̂_ref(a|s) = Δh ⊙ W_a − (Δh·W_a − Δlog π(a|s))/d`` (``token_features``),
  which satisfies ``1ᵀ φ(s, a) = log π_θ(a|s) / π_ref(a|s)`` exactly (the last term is computed from
  the log-probs, so it holds for any output head);
* ``w_p = 1 + head(e_p)`` with ``e_p`` the mean-pooled last hidden state of the backbone (adapter
  off) over the preference text and ``head`` a zero-initialised ``Linear(D, D)``.

With ``w_p = 1`` (Algorithm 1, stage 1: "w_p ← 1") the reward is exactly the DPO token reward
``log π_θ/π_ref``; stage 2 moves w_p away from 1 per preference. The state s always holds the
preference in the PersRM's prompt (Appendix A template), see ``persrm_prompt_ids``.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

from personalign.config import config_to_dict
from personalign.personas.prompts import build_prompt_ids
from personalign.training.lora import LEGACY_LLAMA_TARGETS, fan_in_fan_out, lora_targets
from personalign.views.loading import load_model

__all__ = ["PersRMConfig", "PersRM", "token_features", "backbone_fingerprint", "persrm_prompt_ids",
           "PERSRM_SYSTEM", "ADAPTER", "cosine_decay"]

ADAPTER = "default"
PERSRM_SYSTEM = "Your task is to generate a response by considering the following preference: {preference}"


def cosine_decay(optimizer: Any, steps: int) -> Any:
    """A LambdaLR scheduler: every learning rate decays as 0.5 (1 + cos(π t / steps)), then stays at 0."""

    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))


@dataclass(frozen=True, kw_only=True)
class PersRMConfig:
    """What a PersRM checkpoint is; stored in ``persrm.json``.

    Attributes:
        backbone: the model the PersRM was trained on, as given to ``load_model`` (path, id, smollm2).
        gguf_file: GGUF file name of the backbone, if any.
        fingerprint: ``backbone_fingerprint`` of that backbone; loading onto another one is refused.
        lora_r: LoRA rank (the paper: 8, all layers).
        lora_alpha: LoRA scaling numerator.
        target_modules: module names that get LoRA (never the output head); ``create`` resolves them
            per architecture (``training.lora``: every attention and MLP projection).
        beta: β of Eq. 9 used in training.
    """

    backbone: str
    gguf_file: str | None = None
    fingerprint: str = ""
    lora_r: int = 8
    lora_alpha: int = 16
    target_modules: tuple[str, ...] = LEGACY_LLAMA_TARGETS
    beta: float = 1.0

    def __post_init__(self) -> None:
        if not isinstance(self.backbone, str) or not self.backbone:
            raise ValueError("`backbone` must name the model the PersRM is built on, got an empty value.")
        if self.lora_r < 1:
            raise ValueError(f"`lora_r` must be >= 1, got {self.lora_r}.")
        if self.beta <= 0:
            raise ValueError(f"`beta` must be > 0, got {self.beta}.")
        if "lm_head" in self.target_modules:
            raise ValueError("`target_modules` must not include the output head: φ assumes π_θ and π_ref share it.")


def backbone_fingerprint(model: Any, tokenizer: Any) -> str:
    """A short hash of the backbone's architecture, vocabulary and input-embedding weights."""
    cfg = model.config
    emb = model.get_input_embeddings().weight.detach()
    record = {
        "model_type": getattr(cfg, "model_type", ""),
        "hidden_size": getattr(cfg, "hidden_size", None),
        "layers": getattr(cfg, "num_hidden_layers", None),
        "vocab": len(tokenizer),
        "emb_shape": list(emb.shape),
        "emb_sum": f"{float(emb.double().sum()):.6e}",
        "emb_abs": f"{float(emb.double().abs().sum()):.6e}",
    }
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:16]


def persrm_prompt_ids(tokenizer: Any, prompt: Any, preference: str, chat_template: bool = True) -> tuple[int, ...]:
    """Token ids of the PersRM's state prefix: the preference (system text) and the prompt."""
    return build_prompt_ids(tokenizer, prompt, system=PERSRM_SYSTEM.format(preference=preference),
                            chat_template=chat_template)


def token_features(delta_hidden: torch.Tensor, out_rows: torch.Tensor, delta_logprobs: torch.Tensor) -> torch.Tensor:
    """φ(s, a) of Eq. 4 (see the module docstring).

    Args:
        delta_hidden: h_θ(s) − h_ref(s), float [..., D] (broadcast against ``out_rows``).
        out_rows: output-head rows W_a of the actions, float [..., D].
        delta_logprobs: log π_θ(a|s) − log π_ref(a|s), float [...].

    Returns:
        φ float [..., D] with ``φ.sum(-1) == delta_logprobs``.
    """
    contrib = delta_hidden * out_rows  # [..., D]
    D = contrib.shape[-1]
    return contrib - ((contrib.sum(-1) - delta_logprobs) / D)[..., None]


class PersRM(torch.nn.Module):
    """Frozen π_ref + LoRA π_θ on one backbone, and the value head p -> w_p.

    Args:
        lm: a ``peft.PeftModel`` (adapter ``"default"``) over the backbone causal LM.
        tokenizer: the backbone's tokenizer.
        config: the checkpoint's ``PersRMConfig``.
    """

    def __init__(self, lm: Any, tokenizer: Any, config: PersRMConfig) -> None:
        super().__init__()
        self.lm = lm
        self.tokenizer = tokenizer
        self.config = config
        D = self.hidden_size
        self.head = torch.nn.Linear(D, D)
        torch.nn.init.zeros_(self.head.weight)
        torch.nn.init.zeros_(self.head.bias)
        self.head.to(self.out_weight.device)
        self._pref_cache: dict[str, torch.Tensor] = {}

    # -------------------------------------------------------------- construction
    @classmethod
    def create(cls, backbone: Any, tokenizer: Any, *, name: str, gguf_file: str | None = None,
               lora_r: int = 8, lora_alpha: int = 16, beta: float = 1.0,
               target_modules: Sequence[str] | None = None) -> PersRM:
        """Inject a fresh LoRA adapter into ``backbone`` (in place) and add a zero value head."""

        targets = lora_targets(backbone, target_modules, what="the PersRM backbone")
        config = PersRMConfig(backbone=name, gguf_file=gguf_file, fingerprint=backbone_fingerprint(backbone, tokenizer),
                              lora_r=lora_r, lora_alpha=lora_alpha, target_modules=targets, beta=beta)
        lora = LoraConfig(r=lora_r, lora_alpha=lora_alpha, lora_dropout=0.0, target_modules=list(targets),
                          fan_in_fan_out=fan_in_fan_out(backbone, targets), bias="none", task_type="CAUSAL_LM")
        return cls(get_peft_model(backbone, lora), tokenizer, config)

    @property
    def base_lm(self) -> Any:
        return self.lm.get_base_model()

    @property
    def hidden_size(self) -> int:
        return int(self.base_lm.get_output_embeddings().weight.shape[1])

    @property
    def out_weight(self) -> torch.Tensor:
        """The output head weight W, float [V_out, D] (shared by π_θ and π_ref)."""
        return self.base_lm.get_output_embeddings().weight

    def _decoder(self) -> Any:
        lm = self.base_lm
        return lm.model if hasattr(lm, "model") else lm.get_decoder()

    # -------------------------------------------------------------- preference -> w_p
    def encode_preferences(self, texts: Sequence[str]) -> torch.Tensor:
        """e_p: mean-pooled last hidden state of the frozen backbone over each text, float [P, D]."""
        tok = self.tokenizer
        rows = [tok(t, add_special_tokens=False)["input_ids"] or [tok.eos_token_id or 0] for t in texts]
        W = max(len(r) for r in rows)
        dev = self.out_weight.device
        ids = torch.zeros(len(rows), W, dtype=torch.long)
        mask = torch.zeros(len(rows), W, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r)
            mask[i, : len(r)] = 1
        with torch.no_grad(), self.lm.disable_adapter():
            h = self._decoder()(input_ids=ids.to(dev), attention_mask=mask.to(dev)).last_hidden_state
        m = mask.to(dev, h.dtype)[..., None]
        return ((h * m).sum(1) / m.sum(1)).float()

    def preference_weights(self, texts: Sequence[str], *, cache: bool = False) -> torch.Tensor:
        """w_p = 1 + head(e_p), float [P, D]. ``cache``: memoize e_p per text (inference)."""
        if cache:
            missing = [t for t in dict.fromkeys(texts) if t not in self._pref_cache]
            if missing:
                for t, e in zip(missing, self.encode_preferences(missing)):
                    self._pref_cache[t] = e
            enc = torch.stack([self._pref_cache[t] for t in texts])
        else:
            enc = self.encode_preferences(texts)
        return 1.0 + self.head(enc.to(self.head.weight.dtype))

    # -------------------------------------------------------------- features of sequences
    def _hidden(self, ids: torch.Tensor, mask: torch.Tensor, adapter: bool) -> torch.Tensor:
        if adapter:
            return self._decoder()(input_ids=ids, attention_mask=mask).last_hidden_state
        with torch.no_grad(), self.lm.disable_adapter():
            return self._decoder()(input_ids=ids, attention_mask=mask).last_hidden_state

    def sequence_features(self, prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]]) -> torch.Tensor:
        """Σ_t φ(s_t, a_t) over each response's tokens, float [N, D] (differentiable in π_θ).

        Rows are right-padded (position ids = arange, correct for right padding). Only the positions
        that predict response tokens go through the output head, keeping memory at [tokens, V].
        """
        if len(prompts) != len(responses):
            raise ValueError("`prompts` and `responses` must have the same length.")
        seqs = [list(p) + list(r) for p, r in zip(prompts, responses)]
        N, T = len(seqs), max(len(s) for s in seqs)
        dev = self.out_weight.device
        ids = torch.zeros(N, T, dtype=torch.long)
        mask = torch.zeros(N, T, dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, : len(s)] = torch.tensor(s)
            mask[i, : len(s)] = 1
        ids, mask = ids.to(dev), mask.to(dev)
        row, pos, tgt = [], [], []
        for i, (p, r) in enumerate(zip(prompts, responses)):
            for j, a in enumerate(r):
                row.append(i)
                pos.append(len(p) + j - 1)  # the position whose output predicts response token j
                tgt.append(int(a))
        if any(q < 0 for q in pos):
            raise ValueError("every prompt needs at least one token before its response.")
        row_t, pos_t, tgt_t = (torch.tensor(x, device=dev) for x in (row, pos, tgt))
        h_th = self._hidden(ids, mask, adapter=True)[row_t, pos_t].float()  # [M, D]
        h_ref = self._hidden(ids, mask, adapter=False)[row_t, pos_t].float()
        head = self.base_lm.get_output_embeddings()
        lp_th = torch.log_softmax(head(h_th.to(head.weight.dtype)).float(), -1).gather(-1, tgt_t[:, None])[:, 0]
        lp_ref = torch.log_softmax(head(h_ref.to(head.weight.dtype)).float(), -1).gather(-1, tgt_t[:, None])[:, 0]
        phi = token_features(h_th - h_ref, self.out_weight[tgt_t].float(), lp_th - lp_ref)  # [M, D]
        return torch.zeros(N, phi.shape[-1], device=dev, dtype=phi.dtype).index_add(0, row_t, phi)

    def forward(self, prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]]) -> torch.Tensor:
        """``sequence_features`` (the training forward; through ``forward`` so DDP wrappers see it)."""
        return self.sequence_features(prompts, responses)

    # -------------------------------------------------------------- rewards
    @torch.no_grad()
    def sequence_reward(self, prompts: Sequence[Any], responses: Sequence[str], preferences: Sequence[str],
                        *, chat_template: bool = True, batch_size: int = 8) -> list[float]:
        """R(p, x, y) = β Σ_t w_pᵀ φ(s_t, a_t) (Eq. 8 without the constant V*(s_1)), one per response."""
        if not (len(prompts) == len(responses) == len(preferences)):
            raise ValueError("`prompts`, `responses` and `preferences` must have the same length.")
        out: list[float] = []
        for s in range(0, len(prompts), batch_size):
            sl = slice(s, s + batch_size)
            p_ids = [persrm_prompt_ids(self.tokenizer, x, p, chat_template) for x, p in zip(prompts[sl], preferences[sl])]
            r_ids = [self.tokenizer(y, add_special_tokens=False)["input_ids"] for y in responses[sl]]
            feats = self.sequence_features(p_ids, r_ids)
            w = self.preference_weights(list(preferences[sl]), cache=True).float()
            out.extend((self.config.beta * (w * feats).sum(-1)).tolist())
        return out

    # -------------------------------------------------------------- checkpoints
    def save(self, out_dir: str, extra: dict[str, Any] | None = None) -> None:
        """Write ``adapter/`` (PEFT), ``head.safetensors`` and ``persrm.json`` (config + ``extra``)."""



        d = Path(out_dir)
        d.mkdir(parents=True, exist_ok=True)
        self.lm.save_pretrained(str(d / "adapter"))
        save_file({k: v.detach().cpu().contiguous() for k, v in self.head.state_dict().items()}, str(d / "head.safetensors"))
        (d / "persrm.json").write_text(json.dumps({"config": config_to_dict(self.config), **(extra or {})}, indent=2))

    @staticmethod
    def read_config(ckpt_dir: str) -> PersRMConfig:
        p = Path(ckpt_dir) / "persrm.json"
        if not p.is_file():
            raise ValueError(f"`persrm` {ckpt_dir!r} is not a PersRM checkpoint (no persrm.json).")
        c = json.loads(p.read_text())["config"]
        c["target_modules"] = tuple(c.get("target_modules", LEGACY_LLAMA_TARGETS))
        return PersRMConfig(**c)

    @classmethod
    def load(cls, ckpt_dir: str, backbone: Any | None = None, tokenizer: Any | None = None,
             device: str = "cpu") -> PersRM:
        """Load a checkpoint. ``backbone`` (a causal LM) receives the adapter in place; without it the
        backbone recorded in the config is loaded. A backbone whose fingerprint differs is refused."""


        config = cls.read_config(ckpt_dir)
        if backbone is None:
            lm = load_model(config.backbone, gguf_file=config.gguf_file, dtype="float32", device=device)
            backbone, tokenizer = lm.model, lm.tokenizer
        if tokenizer is None:
            raise ValueError("`tokenizer` is required with `backbone`.")
        fp = backbone_fingerprint(backbone, tokenizer)
        if config.fingerprint and fp != config.fingerprint:
            raise ValueError(
                f"`persrm` {ckpt_dir!r} was trained on backbone {config.backbone!r} (fingerprint {config.fingerprint}); "
                f"the given model has fingerprint {fp}. Load it on the same backbone (or pass its --model)."
            )
        lm = PeftModel.from_pretrained(backbone, str(Path(ckpt_dir) / "adapter"), is_trainable=False)
        model = cls(lm, tokenizer, config)
        model.head.load_state_dict(load_file(str(Path(ckpt_dir) / "head.safetensors")))
        model.head.to(model.out_weight.device)
        return model.eval()
