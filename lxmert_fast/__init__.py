"""lxmert-fast: LXMERT pre-training and fine-tuning at modern speed.

The model classes are drop-ins for transformers' LXMERT classes; checkpoints load from HF
directories, the original release and our own saves.
"""

__version__ = "0.1.0"

from lxmert_fast.config import ConfigError, LxmertConfig
from lxmert_fast.model import (
    AttentionBackendError,
    CheckpointError,
    LxmertForPreTraining,
    LxmertForQuestionAnswering,
    LxmertModel,
)

__all__ = [
    "AttentionBackendError",
    "CheckpointError",
    "ConfigError",
    "LxmertConfig",
    "LxmertForPreTraining",
    "LxmertForQuestionAnswering",
    "LxmertModel",
    "__version__",
]
