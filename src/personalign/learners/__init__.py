"""Learners: how a user's choices become state that shapes their later answers (``learners.base``: the
contract). Each built-in registers itself on import; this list is the whole set."""

from personalign.learners import drift, incontext, pdpo  # noqa: F401  (registration, one module per learner)
from personalign.learners.base import (
    LEARNERS,
    Contribution,
    FoldRejected,
    Item,
    Learner,
    LearnerEnv,
    Merge,
    RequestView,
    Tasks,
    Undo,
    field_learner,
    learner_names,
    make_learners,
    state_before,
    state_fields,
)

__all__ = ["LEARNERS", "Contribution", "FoldRejected", "Item", "Learner", "LearnerEnv", "Merge", "RequestView",
           "Tasks", "Undo", "field_learner", "learner_names", "make_learners", "state_before", "state_fields"]
