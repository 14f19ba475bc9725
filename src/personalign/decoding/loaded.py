"""``Loaded``: what assembly (``personalign.assembly``) loaded and attached for one backend, as the
methods' ``from_resources`` receive it. It lives below the methods so they can name its type."""

from __future__ import annotations

from dataclasses import dataclass, field

from personalign.training.persrm.model import PersRM
from personalign.training.user_model import UserIndex, UserModel
from personalign.views.loading import LoadedModel
from personalign.views.reward import RewardScorer

__all__ = ["Loaded"]


@dataclass
class Loaded:
    """What ``assembly.build_backend`` loaded and attached for one backend (``attached(backend)``).

    Attributes:
        main: the main model as loaded (before any view replaced it in the backend).
        persrm: the PersRM, and whether it shares the main model's weights (``persrm_shared``).
        scorer: the reward scorer; ``reward_key`` the cached reward view's model key, if any.
        pdpo: ``(users, index, model key)`` of the loaded P-DPO checkpoint.
        steer_key: the model Drift steers with (``steer`` when one was given, else ``main``).
        drift_profile: the default Drift profile.
        unmet: requirement name -> why it could not be met.
    """

    main: LoadedModel
    persrm: PersRM | None = None
    persrm_shared: bool = False
    scorer: RewardScorer | None = None
    reward_key: str | None = None
    pdpo: tuple[UserModel, UserIndex, str] | None = None
    steer_key: str = "main"
    drift_profile: str | dict | None = None
    unmet: dict[str, str] = field(default_factory=dict)
