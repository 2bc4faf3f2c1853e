"""Checkpoints, in one place: one module per concern.

- Reading any layout (`layouts`): HF, ours and the original release's key names and the mapping
  between them, transformers' weight conversions (`weight_conversions`, used by `from_pretrained` /
  `save_pretrained`), reading any weights file or HF directory (`read_checkpoint`), the config inferred
  from an original checkpoint's shapes, a state dict copied strictly into a model; `CheckpointError`.
- Reading any checkpoint kind into a fine-tuning model (`task`): HF directories, the original
  ``Epoch20_LXRT.pth`` and ``BEST.pth``, our saves, DeepSpeed tags; answer heads started from another
  answer table; the fine-tuned model saved with its answer table.
- Saving and resuming the training state (`training`): `CheckpointManager` (tags, `latest`, the last K
  kept, a failed save removed), the tag a resume takes (`choose_resume_tag`), how it loads on another
  world size or ZeRO stage (`plan_resume`, DeepSpeed's universal checkpoint).
- A tag's manifest (`manifest`): every file's size and CRC-32s, written last, verified before a tag is
  trusted.
- Exporting (`export`): the engine's full fp32 weights gathered from any ZeRO stage, written as an HF
  directory.

The RNG states a training checkpoint holds are `lxmert_fast.train.rng`'s. This package imports nothing
at import time, so that `lxmert_fast.model` can use `layouts` without a circle.
"""
