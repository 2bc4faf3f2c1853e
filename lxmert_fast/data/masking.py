"""Word and object masking for LXMERT pre-training, vectorised over whole batches.

Exactly the released recipe (``lxmert_pretrain.py``: ``random_word`` / ``random_feat``), but as
tensor ops that run on whatever device the batch is on (no per-sample Python loop, no host sync
on CUDA):

* words: each real word piece (not [CLS] / [SEP] / [PAD]) is selected with p = 0.15; a selected
  one becomes [MASK] with p 0.8, a uniformly random vocabulary id with p 0.1 (any id, as the
  released ``random.choice(tokenizer.vocab)``), and stays with p 0.1. ``labels`` holds the
  original id at selected positions and -100 elsewhere.
* objects: each of the 36 objects is selected with p = 0.15; a selected one is zeroed with p 0.8,
  replaced by a random object feature of *another image* of the batch with p 0.1, and kept with
  p 0.1. ``feat_mask`` is 1.0 at selected objects.

As in the released code one uniform draw ``u`` per position decides both: selected iff
``u < p``, then ``u / p`` picks the 80/10/10 branch.

Those selection draws may come from elsewhere (``u_words`` / ``u_objects`` in the raw batch):
the trainer draws them on the host (:func:`draw_selection`), so that it knows how many words and
objects a batch masks (:func:`selection_counts`) before the step, without reading anything back
from the device, and can give the model a static row budget that fits (``lxmert_fast.model.rows``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

IGNORE_INDEX = -100


@dataclass(frozen=True)
class MaskingConfig:
    """What masking needs to know about the vocabulary, and the rates."""

    vocab_size: int
    mask_id: int
    never_mask: tuple[int, ...]   # [CLS], [SEP], [PAD]
    word_prob: float = 0.15
    obj_prob: float = 0.15


def _rand(shape, like: torch.Tensor, generator):
    return torch.rand(shape, generator=generator, device=like.device)


def word_candidates(input_ids_bl: torch.Tensor, attention_mask_bl: torch.Tensor, never_mask=()) -> torch.Tensor:
    """(B, L) bool: the word pieces masking may select (real tokens other than ``never_mask``)."""
    cand_bl = attention_mask_bl.bool()
    if len(never_mask):
        specials = torch.as_tensor(list(never_mask), device=input_ids_bl.device, dtype=input_ids_bl.dtype)
        cand_bl = cand_bl & ~torch.isin(input_ids_bl, specials)
    return cand_bl


def mask_words(input_ids_bl: torch.Tensor, attention_mask_bl: torch.Tensor, *, vocab_size: int,
               mask_id: int, never_mask=(), generator: torch.Generator | None = None,
               prob: float = 0.15, u_bl: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT word masking. Returns ``(masked_ids_bl, labels_bl)`` (labels -100 = not predicted).

    ``u_bl``: the selection draws (uniform in [0, 1), shape of the ids); drawn from ``generator``
    when not given.
    """
    ids = input_ids_bl
    if u_bl is None:
        u_bl = _rand(ids.shape, ids, generator)
    elif u_bl.shape != ids.shape:
        raise ValueError(f"mask_words: u_bl has shape {tuple(u_bl.shape)}, expected the ids' {tuple(ids.shape)}")
    cand_bl = word_candidates(ids, attention_mask_bl, never_mask)
    sel_bl = cand_bl & (u_bl < prob)
    v_bl = u_bl / prob
    to_mask = sel_bl & (v_bl < 0.8)
    to_rand = sel_bl & (v_bl >= 0.8) & (v_bl < 0.9)
    rand_ids = torch.randint(0, vocab_size, ids.shape, generator=generator, device=ids.device,
                             dtype=ids.dtype)
    out = torch.where(to_mask, torch.full_like(ids, mask_id), ids)
    out = torch.where(to_rand, rand_ids, out)
    labels = torch.where(sel_bl, ids, torch.full_like(ids, IGNORE_INDEX))
    return out, labels


def _donor_rows(group_b: torch.Tensor | None, b: int, n: int, device, generator) -> torch.Tensor:
    """(B, N) batch rows to take replacement features from: a row of another image if any."""
    if group_b is None:
        group_b = torch.arange(b, device=device)
    other_bb = (group_b[:, None] != group_b[None, :]).float()
    # a row whose batch holds only its own image falls back to its own image (documented)
    other_bb = torch.where(other_bb.sum(1, keepdim=True) > 0, other_bb,
                           torch.ones_like(other_bb))
    return torch.multinomial(other_bb, n, replacement=True, generator=generator)


def mask_objects(feats_bnd: torch.Tensor, *, prob: float = 0.15,
                 generator: torch.Generator | None = None,
                 group_b: torch.Tensor | None = None,
                 sync_free: bool | None = None,
                 u_bn: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Object masking. Returns ``(masked_feats_bnd float32, feat_mask_bn float32)``.

    ``feats_bnd`` (B, N, F) in any float dtype (fp16 as stored); it is not changed.
    ``group_b`` (B,): image id (store row) of each batch row; replacement features come from a
    row with a different image. Without it every other row counts as another image.
    ``sync_free``: dense ``torch.where`` formulation (default on accelerators) instead of
    touching only the selected rows (default on CPU, where each pass over the (B, N, F) features
    costs); both give identical results.
    ``u_bn``: the selection draws (B, N); drawn from ``generator`` when not given.
    """
    b, n, d = feats_bnd.shape
    dev = feats_bnd.device
    if u_bn is None:
        u_bn = _rand((b, n), feats_bnd, generator)
    elif u_bn.shape != (b, n):
        raise ValueError(f"mask_objects: u_bn has shape {tuple(u_bn.shape)}, expected {(b, n)}")
    sel_bn = u_bn < prob
    v_bn = u_bn / prob
    zero_bn = sel_bn & (v_bn < 0.8)
    repl_bn = sel_bn & (v_bn >= 0.8) & (v_bn < 0.9)
    donor_b_bn = _donor_rows(group_b, b, n, dev, generator)
    donor_n_bn = torch.randint(0, n, (b, n), generator=generator, device=dev)
    if sync_free is None:
        sync_free = dev.type != "cpu"
    if not sync_free:  # sparse: one float32 copy, then the selected rows only (syncs on GPU)
        feats_nd = feats_bnd.reshape(b * n, d)
        out_nd = feats_nd.to(torch.float32, memory_format=torch.contiguous_format, copy=True)
        out_nd.index_fill_(0, zero_bn.reshape(-1).nonzero().squeeze(1), 0.0)
        repl_rows = repl_bn.reshape(-1).nonzero().squeeze(1)
        donor_rows = (donor_b_bn * n + donor_n_bn).reshape(-1).index_select(0, repl_rows)
        out_nd.index_copy_(0, repl_rows, feats_nd.index_select(0, donor_rows).float())
        out = out_nd.view(b, n, d)
    else:  # dense and sync-free
        feats = feats_bnd.float()
        donor = feats[donor_b_bn, donor_n_bn]
        out = torch.where(zero_bn[..., None], torch.zeros((), device=dev), feats)
        out = torch.where(repl_bn[..., None], donor, out)
    return out, sel_bn.float()


def mask_pretrain_batch(raw: dict, cfg: MaskingConfig,
                        generator: torch.Generator | None = None) -> dict:
    """Raw (unmasked) collated batch -> the model's batch, masking on the batch's device.

    ``raw`` keys (from :class:`~lxmert_fast.data.pretrain_data.PretrainDataset`): input_ids,
    attention_mask, token_type_ids (B, L); visual_feats (B, N, F) fp16/fp32; visual_pos (B, N, 4);
    obj_ids, obj_conf, attr_ids, attr_conf (B, N); matched_label, ans, img_index (B,); optionally
    the selection draws u_words (B, L) and u_objects (B, N) (:func:`draw_selection`).

    The model's ``visual_feats`` are float32; the feature-regression target ``obj_labels["feat"][0]``
    is the unmasked ``visual_feats`` itself, in the stored dtype (no copy: the loss converts the
    masked rows it reads).
    """
    ids, labels = mask_words(raw["input_ids"], raw["attention_mask"], vocab_size=cfg.vocab_size,
                             mask_id=cfg.mask_id, never_mask=cfg.never_mask,
                             generator=generator, prob=cfg.word_prob, u_bl=raw.get("u_words"))
    feats = raw["visual_feats"]
    masked, feat_mask = mask_objects(feats, prob=cfg.obj_prob, generator=generator,
                                     group_b=raw.get("img_index"), u_bn=raw.get("u_objects"))
    return {
        "input_ids": ids,
        "attention_mask": raw["attention_mask"],
        "token_type_ids": raw["token_type_ids"],
        "visual_feats": masked,
        "visual_pos": raw["visual_pos"].float(),
        "labels": labels,
        "obj_labels": {
            "obj": (raw["obj_ids"].long(), raw["obj_conf"].float()),
            "attr": (raw["attr_ids"].long(), raw["attr_conf"].float()),
            "feat": (feats, feat_mask),
        },
        "matched_label": raw["matched_label"],
        "ans": raw["ans"],
    }


def draw_selection(raw: dict, generator: torch.Generator | None = None) -> dict:
    """The selection draws of a raw batch, on the raw batch's device (the host, for the trainer):
    ``{"u_words": (B, L), "u_objects": (B, N)}``, to put into the batch before masking it."""
    ids, feats = raw["input_ids"], raw["visual_feats"]
    return {"u_words": _rand(ids.shape, ids, generator), "u_objects": _rand(feats.shape[:2], feats, generator)}


def selection_counts(raw: dict, draws: dict, cfg: MaskingConfig) -> tuple[int, int]:
    """(masked words, masked objects) that masking ``raw`` with ``draws`` selects: computed where the
    raw batch is (the host), so the trainer knows them before the step."""
    cand_bl = word_candidates(raw["input_ids"], raw["attention_mask"], cfg.never_mask)
    words = int((cand_bl & (draws["u_words"] < cfg.word_prob)).sum())
    objects = int((draws["u_objects"] < cfg.obj_prob).sum())
    return words, objects


def masked_counts(batch: dict) -> tuple[int, int]:
    """(masked words, masked objects) of an already masked batch (read where it is: the host, for
    batches the loader workers masked)."""
    return int((batch["labels"] >= 0).sum()), int((batch["obj_labels"]["feat"][1] != 0).sum())
