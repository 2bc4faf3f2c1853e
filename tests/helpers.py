"""Builders shared by the model tests: tiny configs, HF twins with the same weights, random batches."""

from __future__ import annotations

import os
import socket

import torch
import transformers

from lxmert_fast import LxmertConfig
from lxmert_fast.checkpoints.layouts import hf_to_ours, load_state_into


def no_dropout(config: LxmertConfig) -> LxmertConfig:
    return config.replace(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def hf_config(config: LxmertConfig) -> transformers.LxmertConfig:
    return transformers.LxmertConfig(**{name: getattr(config, name) for name in config.hf_field_names()})


def twin_models(config: LxmertConfig, ours_cls, hf_cls):
    """(ours, hf) with identical weights, HF's random init, both in train mode."""
    hf = hf_cls(hf_config(config))
    ours = ours_cls(config)
    load_state_into(ours, hf_to_ours(hf.state_dict(), config), "hf twin",
                    ignore_prefixes=tuple(p for p in ("cls.", "obj_predict_head.", "answer_head.")
                                          if not any(k.startswith(p) for k in ours.state_dict())))
    return ours, hf


def random_batch(config: LxmertConfig, batch: int = 3, tokens: int = 7, objects: int = 5,
                 lengths=None, generator=None) -> dict:
    """Inputs with padded sentences of different lengths (`lengths` per row, default varied)."""
    g = generator
    input_ids = torch.randint(1, config.vocab_size, (batch, tokens), generator=g)
    if lengths is None:
        lengths = [max(1, tokens - (i * 3) % tokens) for i in range(batch)]
    attention_mask = torch.zeros(batch, tokens, dtype=torch.long)
    for row, length in enumerate(lengths):
        attention_mask[row, :length] = 1
    input_ids = input_ids * attention_mask
    return dict(
        input_ids=input_ids,
        attention_mask=attention_mask,
        token_type_ids=torch.zeros(batch, tokens, dtype=torch.long),
        visual_feats=torch.randn(batch, objects, config.visual_feat_dim, generator=g),
        visual_pos=torch.rand(batch, objects, config.visual_pos_dim, generator=g),
    )


def random_labels(config: LxmertConfig, inputs: dict, generator=None) -> dict:
    g = generator
    batch, tokens = inputs["input_ids"].shape
    objects = inputs["visual_feats"].shape[1]
    labels = torch.full((batch, tokens), -100, dtype=torch.long)
    pick = (torch.rand(batch, tokens, generator=g) < 0.4) & inputs["attention_mask"].bool()
    pick[0, 0] = True  # at least one predicted token
    labels[pick] = torch.randint(0, config.vocab_size, (int(pick.sum()),), generator=g)
    feat_mask = (torch.rand(batch, objects, generator=g) < 0.3).float()
    obj_labels = {
        "obj": (torch.randint(0, config.num_object_labels, (batch, objects), generator=g),
                torch.rand(batch, objects, generator=g)),
        "attr": (torch.randint(0, config.num_attr_labels, (batch, objects), generator=g),
                 torch.rand(batch, objects, generator=g)),
        "feat": (torch.randn(batch, objects, config.visual_feat_dim, generator=g), feat_mask),
    }
    matched = torch.randint(0, 2, (batch,), generator=g)
    ans = torch.randint(0, max(config.num_qa_labels, 1), (batch,), generator=g)
    ans[matched == 0] = -100
    if bool((ans < 0).all()):
        ans[0] = 0
    return dict(labels=labels, obj_labels=obj_labels, matched_label=matched, ans=ans)


def kernel_device() -> torch.device:
    """Where the tests run the Triton kernels (the `triton` backend, the fused ops): CUDA when the machine has
    it (the kernels are compiled), else the CPU (tests/conftest.py turned Triton's interpreter on)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def to_device(obj, device):
    """Tensors, and dicts / tuples / lists of them (a batch, its labels), moved to `device`."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (tuple, list)):
        return type(obj)(to_device(v, device) for v in obj)
    return obj


def assert_close_scaled(ours: torch.Tensor, ref: torch.Tensor, what: str, rel: float = 1e-5,
                        floor: float = 1e-3) -> None:
    """max |ours - ref| <= rel * max(max |ref|, floor): the reference's scale.

    The floor covers gradients that are zero in exact arithmetic (a key bias cannot change a
    softmax), where both sides hold rounding noise of order 1e-12.
    """
    assert ours.shape == ref.shape, f"{what}: shape {tuple(ours.shape)} vs {tuple(ref.shape)}"
    assert torch.isfinite(ours).all(), f"{what}: non-finite values"
    scale = ref.abs().max().item()
    diff = (ours.double() - ref.double()).abs().max().item()
    assert diff <= rel * max(scale, floor), f"{what}: max abs diff {diff:.3e} > {rel} x scale {scale:.3e}"


DISTRIBUTED_ENV_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now: a launcher's rendezvous port of its own, so that launcher tests can run
    side by side (pytest -n 2) without meeting on the launchers' default 29500."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def child_env() -> dict:
    """os.environ for a child process, without the torch.distributed variables.

    Tests that initialise torch.distributed in the pytest process (a single-process job) leave RANK,
    WORLD_SIZE and MASTER_PORT set, with that store still listening on the port: a child that
    inherited them would fail to bind it (EADDRINUSE) or join the wrong group.
    """
    env = dict(os.environ)
    for key in DISTRIBUTED_ENV_KEYS:
        env.pop(key, None)
    return env
