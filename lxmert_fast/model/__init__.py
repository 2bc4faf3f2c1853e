"""The LXMERT model: layers, attention backends, heads (checkpoint layouts: lxmert_fast.checkpoints)."""

from lxmert_fast.model.attention import (
    AttentionBackend,
    AttentionBackendError,
    AttentionDispatcher,
    available_backend_names,
    register_backend,
)
from lxmert_fast.checkpoints.layouts import CheckpointError
from lxmert_fast.model.lxmert import (
    LxmertForPreTraining,
    LxmertForQuestionAnswering,
    LxmertModel,
    LxmertPreTrainedModel,
)

__all__ = [
    "AttentionBackend",
    "AttentionBackendError",
    "AttentionDispatcher",
    "CheckpointError",
    "LxmertForPreTraining",
    "LxmertForQuestionAnswering",
    "LxmertModel",
    "LxmertPreTrainedModel",
    "available_backend_names",
    "register_backend",
]
