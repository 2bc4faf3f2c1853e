"""Loading any checkpoint kind into a fine-tuning model, and starting its answer head from another table.

Checkpoints (:func:`read_task_checkpoint`): an HF directory (lxmert-base-uncased's layout and the
QA models lxmert-vqa-uncased / lxmert-gqa-uncased), the original ``Epoch20_LXRT.pth`` (also as
``--load .../Epoch20`` the way the original scripts name it), an original fine-tuned ``BEST.pth``
(``lxrt_encoder.model.bert.*`` + ``logit_fc.*``), our ``save_pretrained`` directories and
fine-tuning saves, our pre-training output directory (its ``hf`` export, else the latest
DeepSpeed checkpoint) and DeepSpeed checkpoint directories (``latest`` / a tag /
``mp_rank_00_model_states.pt``). Everything is read with ``torch.load(weights_only=True)``
(DeepSpeed's client state needs numpy's array reconstructor, allow-listed) or safetensors.

A QA head in the checkpoint with its own answer table (the 9500 answers of pre-training) starts
the task head (:func:`copy_answer_head`): the hidden layers are copied entirely and the output rows
of the answers both tables share are copied, each looked up as the original code does (the task's
answer after the pre-training normalisation, e.g. "two" -> "2"), then as written; the other rows keep
their fresh initialisation (the original code zeroes them: ``unmatched="zero"``). The answer tables
are read here (lxmert_fast.data.formats), so that the model package imports nothing from data/.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
from torch import nn

try:
    from numpy._core.multiarray import _reconstruct
except ImportError:  # numpy < 2
    from numpy.core.multiarray import _reconstruct  # type: ignore

from lxmert_fast.checkpoints.layouts import (
    CheckpointError,
    detect_layout,
    hf_to_ours,
    infer_config,
    load_state_into,
    original_to_hf,
    read_checkpoint,
)
from lxmert_fast.config import ConfigError, LxmertConfig
from lxmert_fast.data.answers import convert_ans
from lxmert_fast.data.formats import DataFormatError, read_all_ans, read_ans2label, read_json, read_label2ans
from lxmert_fast.utils import atomic_directory, atomic_write_text

Tensor = torch.Tensor

DS_MODEL_FILE = "mp_rank_00_model_states.pt"
ANSWERS_FILE = "answers.json"          # written beside our fine-tuned saves: the head's label2ans
_DROP_HEADS = ("cls.", "obj_predict_head.")
_ENCODER = "lxmert."
_QA_HEAD = "answer_head."
_PAIR_HEAD = "logit_fc."


# ---------------------------------------------------------------------------------------------- checkpoints
@dataclass
class TaskCheckpoint:
    """A checkpoint split into the encoder (keys of LxmertModel, our layout) and heads (our layout)."""

    path: str
    kind: str                                   # hf | original | ours | deepspeed | original-finetuned
    config: LxmertConfig
    encoder: dict[str, Tensor]
    heads: dict[str, Tensor] = field(default_factory=dict)
    config_source: str = ""
    notes: list[str] = field(default_factory=list)

    @property
    def qa_rows(self) -> Optional[int]:
        w = self.heads.get("answer_head.logit_fc.3.weight")
        return None if w is None else int(w.shape[0])

    @property
    def has_pair_head(self) -> bool:
        return "logit_fc.3.weight" in self.heads


def _numpy_safe_globals() -> list:
    dtypes = [getattr(np.dtypes, n) for n in dir(np.dtypes) if n.endswith("DType")] if hasattr(np, "dtypes") else []
    return [_reconstruct, np.ndarray, np.dtype] + dtypes


def read_deepspeed_model_states(path: str) -> dict:
    """A DeepSpeed ``mp_rank_00_model_states.pt``, with weights_only=True (numpy arrays of the RNG state allowed)."""
    try:
        with torch.serialization.safe_globals(_numpy_safe_globals()):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - pickle/zip errors, refused globals
        raise CheckpointError(f"{path}: cannot be read with torch.load(weights_only=True): {err}") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("module"), dict):
        raise CheckpointError(f"{path}: not a DeepSpeed model-states file (no 'module' state dict)")
    return obj


def resolve_checkpoint(path: str) -> tuple[str, str]:
    """(kind, path): 'deepspeed' + model-states file, or 'file' + a path read_checkpoint reads."""
    p = os.fspath(path)
    if not os.path.exists(p):
        for suffix in ("_LXRT.pth", ".pth"):  # the original scripts' `--load snap/.../Epoch20`
            if os.path.isfile(p + suffix):
                return "file", p + suffix
        raise CheckpointError(f"--load {p}: no such file or directory")
    if os.path.isfile(p):
        return ("deepspeed", p) if p.endswith("_model_states.pt") else ("file", p)
    if os.path.isfile(os.path.join(p, DS_MODEL_FILE)):
        return "deepspeed", os.path.join(p, DS_MODEL_FILE)
    for ckdir in (p, os.path.join(p, "checkpoints")):
        latest = os.path.join(ckdir, "latest")
        if os.path.isfile(latest) and not os.path.isfile(os.path.join(p, "config.json")):
            if ckdir != p and os.path.isfile(os.path.join(p, "hf", "config.json")):
                return "file", os.path.join(p, "hf")  # a pre-training output dir: its fp32 export
            with open(latest, encoding="utf-8") as fh:
                tag = fh.read().strip()
            f = os.path.join(ckdir, tag, DS_MODEL_FILE)
            if not os.path.isfile(f):
                raise CheckpointError(f"--load {p}: {latest} names {tag!r} but {f} does not exist")
            return "deepspeed", f
    if os.path.isfile(os.path.join(p, "hf", "config.json")) and not os.path.isfile(os.path.join(p, "config.json")):
        return "file", os.path.join(p, "hf")
    return "file", p


def _config_near(path: str) -> Optional[str]:
    """config.json / model_config.json beside a file, or up to two directories above (DeepSpeed tags)."""
    d = os.path.dirname(os.path.abspath(path))
    for _ in range(3):
        for name in ("config.json", "model_config.json"):
            c = os.path.join(d, name)
            if os.path.isfile(c):
                return c
        d = os.path.dirname(d)
    return None


def _split_state(state: dict[str, Tensor], config: LxmertConfig) -> tuple[dict, dict]:
    """HF/ours-layout state -> (encoder keys relative to LxmertModel in our layout, heads in our layout)."""
    state = {k: v for k, v in state.items() if not k.startswith(_DROP_HEADS)}
    ours = hf_to_ours(state, config)  # fuses q/k/v; our layout passes through
    has_prefix = any(k.startswith(_ENCODER) for k in ours)
    encoder, heads = {}, {}
    for k, v in ours.items():
        if k.startswith((_QA_HEAD, _PAIR_HEAD)):
            heads[k] = v
        elif has_prefix:
            if k.startswith(_ENCODER):
                encoder[k[len(_ENCODER):]] = v
            else:
                raise CheckpointError(f"unexpected key {k!r} (neither the encoder, 'lxmert.*', nor a known head)")
        else:
            encoder[k] = v
    return encoder, heads


def _from_original_finetuned(raw: dict[str, Tensor]) -> dict[str, Tensor]:
    """The original fine-tuning saves (`lxrt_encoder.model.bert.*`, `logit_fc.*`) -> HF-style keys."""
    out = {}
    for k, v in raw.items():
        k = k[len("module."):] if k.startswith("module.") else k
        if k.startswith("lxrt_encoder.model."):
            k = k[len("lxrt_encoder.model."):]
        out[k] = v
    out = original_to_hf(out)
    hid = None
    emb = out.get("lxmert.embeddings.word_embeddings.weight")
    if emb is not None:
        hid = emb.shape[1]
    w0 = out.get("logit_fc.0.weight")
    if w0 is not None and hid is not None and w0.shape[1] == hid:  # the QA head (hid -> 2 hid), not NLVR2's
        out = {(_QA_HEAD + k if k.startswith(_PAIR_HEAD) else k): v for k, v in out.items()}
    return out


def read_task_checkpoint(path: str, config: Optional[LxmertConfig] = None,
                         log: Optional[Callable[[str], None]] = None) -> TaskCheckpoint:
    """Read any supported checkpoint kind (see the module doc) into encoder + heads."""
    kind, target = resolve_checkpoint(path)
    notes: list[str] = []
    config_source = ""
    config_path: Optional[str] = None
    from_deepspeed = kind == "deepspeed"
    if from_deepspeed:
        obj = read_deepspeed_model_states(target)
        raw = dict(obj["module"])
        empty = [k for k, v in raw.items() if v.numel() == 0]
        if empty:
            raise CheckpointError(
                f"{target}: the weights are partitioned (ZeRO-3: {len(empty)} empty tensors, e.g. {empty[0]!r}); "
                f"load the pre-training export (<output_dir>/hf) or consolidate with the zero_to_fp32.py script "
                f"DeepSpeed wrote beside the checkpoint")
        half = sorted({str(v.dtype) for v in raw.values() if v.is_floating_point() and v.dtype != torch.float32})
        if half:
            notes.append(f"{target}: {'/'.join(half)} module weights upcast to fp32 (the fp32 master copy lives in "
                         f"the optimizer shards; <output_dir>/hf holds the exact fp32 export)")
            raw = {k: (v.float() if v.is_floating_point() else v) for k, v in raw.items()}
        if config is None and isinstance(obj.get("model_config"), dict):
            try:
                config = LxmertConfig.from_dict(obj["model_config"])
            except ConfigError as err:
                raise ConfigError(f"{target}:model_config: {err}") from None
            config_source = f"{target} (client state)"
        if config is None:
            config_path = _config_near(target)
    else:
        raw, config_path = read_checkpoint(target)
    layout = detect_layout(raw)
    if any(k.startswith(("lxrt_encoder.", "module.lxrt_encoder.")) for k in raw):
        state, kind = _from_original_finetuned(raw), "original-finetuned"
    elif layout == "original":
        state = original_to_hf(raw)
        kind = "deepspeed" if from_deepspeed else "original"
    else:
        state = raw
        kind = "deepspeed" if from_deepspeed else ("ours" if layout == "ours" else "hf")
    if config is None:
        if config_path is not None:
            config = LxmertConfig.from_json(config_path)
            config_source = config_path
        else:
            try:
                config = infer_config(state)
            except CheckpointError as err:
                raise CheckpointError(f"{target}: {err}") from None
            config_source = "inferred from the weights' shapes"
    elif not config_source:
        config_source = "given"
    encoder, heads = _split_state(state, config)
    ckpt = TaskCheckpoint(target, kind, config, encoder, heads, config_source, notes)
    if log:
        for n in notes:
            log(n)
    return ckpt


# ---------------------------------------------------------------------------------------------- answers of a head
def read_answer_list(path: str) -> list[str]:
    """An answer table as a list by row: all_ans.json ([{"ans", ...}]), label2ans ([str]) or ans2label ({str: int})."""
    if not os.path.isfile(path):
        raise CheckpointError(f"answer table {path}: no such file")
    data = read_json(path, "answer table")
    if isinstance(data, dict):
        a2l = read_ans2label(path)
        out = [None] * len(a2l)
        for a, i in a2l.items():
            out[i] = a
        return out
    if isinstance(data, list) and all(isinstance(x, str) for x in data):
        return read_label2ans(path)
    if isinstance(data, list) and all(isinstance(x, dict) for x in data):
        return [e["ans"] for e in read_all_ans(path)]
    raise DataFormatError(path, 1, "(file)", "expected all_ans.json ([{\"ans\", \"dsets\"}]), a label2ans list "
                                             "([answer, ...]) or an ans2label dict ({answer: label})")


def find_head_answers(ckpt: TaskCheckpoint, *, load_answers: Optional[str] = None,
                      data_root: Optional[str] = None) -> tuple[Optional[list[str]], str]:
    """The answer table of the checkpoint's QA head: (answers by row or None, where from).

    Order: ``load_answers``; an ``answers.json`` / ``all_ans.json`` / ``trainval_label2ans.json``
    beside the checkpoint; ``<data_root>/lxmert/all_ans.json`` when its size is the head's.
    A table whose size is not the head's is an error.
    """
    rows = ckpt.qa_rows
    if rows is None:
        return None, "no QA head"
    candidates: list[tuple[str, bool]] = []
    if load_answers:
        candidates.append((load_answers, True))
    here = ckpt.path if os.path.isdir(ckpt.path) else os.path.dirname(ckpt.path)
    for d in (here, os.path.dirname(here)):
        for name in (ANSWERS_FILE, "all_ans.json", "trainval_label2ans.json"):
            candidates.append((os.path.join(d, name), True))
    if data_root:
        candidates.append((os.path.join(data_root, "lxmert", "all_ans.json"), False))
    for cand, strict in candidates:
        if not os.path.isfile(cand):
            if cand == load_answers:
                raise CheckpointError(f"--load_answers {cand}: no such file")
            continue
        answers = read_answer_list(cand)
        if len(answers) == rows:
            return answers, cand
        if strict and cand == load_answers:
            raise CheckpointError(f"--load_answers {cand}: {len(answers)} answers, but the checkpoint's QA head "
                                  f"({ckpt.path}) has {rows} rows")
    return None, "not found"


def copy_answer_head(head: nn.Module, src: dict[str, Tensor], src_answers: Optional[Sequence[str]],
                     task_answers: Sequence[str], unmatched: str = "init") -> dict:
    """Start a task QA head (``answer_head`` module) from a checkpoint's head (``src``: logit_fc.* keys).

    Hidden layers (logit_fc.0, .2) are copied entirely; output rows (logit_fc.3) of answers both
    tables share are copied. Without ``src_answers`` the rows are copied only when the head has
    exactly the task's size (taken to be the task's own table, e.g. lxmert-vqa-uncased's).
    ``unmatched``: "init" keeps the fresh initialisation of the other rows, "zero" zeroes them.
    Returns {"copied", "total", "source_rows", "mode"}.
    """
    own = head.state_dict()
    for k in ("logit_fc.0.weight", "logit_fc.0.bias", "logit_fc.2.weight", "logit_fc.2.bias",
              "logit_fc.3.weight", "logit_fc.3.bias"):
        if k not in src:
            raise CheckpointError(f"the checkpoint's answer head lacks {k}")
        if k.startswith(("logit_fc.0", "logit_fc.2")) and tuple(src[k].shape) != tuple(own[k].shape):
            raise CheckpointError(f"answer_head.{k}: checkpoint {tuple(src[k].shape)} vs model {tuple(own[k].shape)}")
    w_src, b_src = src["logit_fc.3.weight"], src["logit_fc.3.bias"]
    k_task, k_src = len(task_answers), w_src.shape[0]
    if w_src.shape[1] != own["logit_fc.3.weight"].shape[1]:
        raise CheckpointError(f"answer_head.logit_fc.3.weight: checkpoint {tuple(w_src.shape)} vs model "
                              f"{tuple(own['logit_fc.3.weight'].shape)}")
    pairs: list[tuple[int, int]] = []
    mode = "by answer"
    if src_answers is not None:
        if len(src_answers) != k_src:
            raise CheckpointError(f"the answer table has {len(src_answers)} answers but the head has {k_src} rows")
        index = {a: i for i, a in enumerate(src_answers)}
        for label, ans in enumerate(task_answers):
            # the original (qa_answer_table.load_lxmert_qa) takes the row of the normalised answer: with both "two"
            # and "2" in the table, "two" gets the row of "2"; as written only where the normalised form is absent
            j = index.get(convert_ans(ans))
            if j is None:
                j = index.get(ans)
            if j is not None:
                pairs.append((label, j))
    elif k_src == k_task:
        pairs = [(i, i) for i in range(k_task)]
        mode = "whole head (same size, no answer table: taken as the task's own)"
    else:
        mode = "hidden layers only (no answer table for the head's rows)"
    with torch.no_grad():
        for name in ("logit_fc.0.weight", "logit_fc.0.bias", "logit_fc.2.weight", "logit_fc.2.bias"):
            own[name].copy_(src[name].to(own[name].dtype))
        w, b = own["logit_fc.3.weight"], own["logit_fc.3.bias"]
        if unmatched == "zero":
            w.zero_()
            b.zero_()
        if pairs:
            dst = torch.tensor([p[0] for p in pairs], dtype=torch.long)
            srcr = torch.tensor([p[1] for p in pairs], dtype=torch.long)
            w[dst] = w_src.index_select(0, srcr).to(w.dtype)
            b[dst] = b_src.index_select(0, srcr).to(b.dtype)
    head.load_state_dict(own)
    return {"copied": len(pairs), "total": k_task, "source_rows": k_src, "mode": mode}


# ---------------------------------------------------------------------------------------------- loading
def check_config_fits(config: LxmertConfig, *, vocab_size: int, feat_dim: int, source: str) -> None:
    problems = []
    if config.vocab_size < vocab_size:
        problems.append(f"vocab_size {config.vocab_size} < the tokenizer's {vocab_size} tokens")
    if config.visual_feat_dim != feat_dim:
        problems.append(f"visual_feat_dim {config.visual_feat_dim} vs the features' {feat_dim}")
    if problems:
        raise CheckpointError(f"{source} does not fit the data: " + "; ".join(problems))


def load_task_weights(task: str, model: nn.Module, ckpt: TaskCheckpoint, *, task_answers: Optional[Sequence[str]],
                      head_answers: Optional[Sequence[str]] = None, head_answers_source: str = "",
                      unmatched: str = "init", log: Callable[[str], None] = print) -> dict:
    """Load the encoder (strictly) and start the task head from the checkpoint's where it can."""
    load_state_into(model.lxmert, ckpt.encoder, ckpt.path)
    info: dict[str, Any] = {"kind": ckpt.kind, "config": ckpt.config_source}
    if task == "nlvr2":
        if ckpt.has_pair_head:
            pair = {k[len(_PAIR_HEAD):]: v for k, v in ckpt.heads.items() if k.startswith(_PAIR_HEAD)}
            load_state_into(model.logit_fc, pair, f"{ckpt.path} (logit_fc)")
            info["head"] = "NLVR2 head loaded"
        else:
            info["head"] = "NLVR2 head freshly initialised"
        log(f"loaded {ckpt.kind} checkpoint {ckpt.path}: encoder; {info['head']}")
        return info
    qa = {k[len(_QA_HEAD):]: v for k, v in ckpt.heads.items() if k.startswith(_QA_HEAD)}
    if not qa:
        info["head"] = "answer head freshly initialised (the checkpoint has none)"
        log(f"loaded {ckpt.kind} checkpoint {ckpt.path}: encoder; {info['head']}")
        return info
    res = copy_answer_head(model.answer_head, qa, head_answers, task_answers, unmatched=unmatched)
    info.update(res)
    src = f" (answer table {head_answers_source})" if head_answers is not None else ""
    info["head"] = (f"answer head from the checkpoint's {res['source_rows']}-answer head{src}: "
                    f"{res['mode']}; copied {res['copied']} of {res['total']} answer rows")
    log(f"loaded {ckpt.kind} checkpoint {ckpt.path}: encoder; {info['head']}")
    if head_answers is None and res["copied"] == 0:
        log(f"warning: the checkpoint's {res['source_rows']}-answer QA head rows were not used: no answer table "
            f"for them (pass --load_answers, e.g. <data_root>/lxmert/all_ans.json)")
    return info


def save_task_model(model: nn.Module, directory: str, *, answers: Optional[Sequence[str]] = None,
                    extra: Optional[dict] = None) -> None:
    """``save_pretrained`` + the head's answer table (answers.json) + finetune.json, into a fresh
    directory that replaces ``directory`` only when complete."""
    with atomic_directory(directory) as tmp:
        model.save_pretrained(tmp)
        if answers is not None:
            atomic_write_text(os.path.join(tmp, ANSWERS_FILE), json.dumps(list(answers)) + "\n")
        if extra is not None:
            atomic_write_text(os.path.join(tmp, "finetune.json"), json.dumps(extra, indent=2, default=str) + "\n")


def config_error_types() -> tuple[type, ...]:
    return (CheckpointError, ConfigError)
