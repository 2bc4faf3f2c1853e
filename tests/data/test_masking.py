"""Masking statistics (15% / 80-10-10), special tokens, ignore index, determinism, devices."""

from __future__ import annotations

import pytest
import torch

from lxmert_fast.data.masking import (IGNORE_INDEX, MaskingConfig, draw_selection, mask_objects,
                                      mask_pretrain_batch, mask_words, masked_counts, selection_counts)

PAD, UNK, CLS, SEP, MASK = 0, 1, 2, 3, 4
VOCAB = 1000


def word_batch(b=8192, L=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, L + 1, (b,), generator=g)
    ids = torch.randint(5, VOCAB, (b, L), generator=g)
    pos = torch.arange(L)[None, :]
    attn = (pos < lengths[:, None]).long()
    ids = torch.where(attn.bool(), ids, torch.full_like(ids, PAD))
    ids[:, 0] = CLS
    ids[torch.arange(b), lengths - 1] = SEP
    return ids, attn


def binom_tol(p, n, z=5.0):
    return z * (p * (1 - p) / n) ** 0.5


def test_word_masking_statistics():
    ids, attn = word_batch()
    g = torch.Generator().manual_seed(1)
    out, labels = mask_words(ids, attn, vocab_size=VOCAB, mask_id=MASK,
                             never_mask=(CLS, SEP, PAD), generator=g, prob=0.15)
    words = attn.bool() & (ids != CLS) & (ids != SEP)
    sel = labels != IGNORE_INDEX
    n_words = int(words.sum())
    # selection: 15% of the real words, never a special token or padding
    assert not (sel & ~words).any()
    assert abs(sel.sum().item() / n_words - 0.15) < binom_tol(0.15, n_words)
    # labels: the original id where predicted, -100 elsewhere
    assert torch.equal(labels[sel], ids[sel])
    assert (labels[~sel] == IGNORE_INDEX).all()
    # untouched outside the selection; [CLS]/[SEP]/[PAD] never changed
    assert torch.equal(out[~sel], ids[~sel])
    n_sel = int(sel.sum())
    masked = (out[sel] == MASK).float().mean().item()
    changed = ((out[sel] != MASK) & (out[sel] != ids[sel])).float().mean().item()
    kept = (out[sel] == ids[sel]).float().mean().item()
    # random tokens equal the original with probability 1/VOCAB (and [MASK] with 1/VOCAB)
    assert abs(masked - (0.8 + 0.1 / VOCAB)) < binom_tol(0.8, n_sel)
    assert abs(changed - 0.1 * (1 - 2 / VOCAB)) < binom_tol(0.1, n_sel)
    assert abs(kept - (0.1 + 0.1 / VOCAB)) < binom_tol(0.1, n_sel)
    # random replacements cover the vocabulary uniformly (any id, as released)
    rnd = out[sel][(out[sel] != MASK) & (out[sel] != ids[sel])]
    assert rnd.min() >= 0 and rnd.max() < VOCAB and rnd.unique().numel() > 0.5 * min(VOCAB, len(rnd))


def test_word_masking_deterministic_and_vectorised():
    ids, attn = word_batch(64)
    a = mask_words(ids, attn, vocab_size=VOCAB, mask_id=MASK, never_mask=(CLS, SEP, PAD),
                   generator=torch.Generator().manual_seed(5))
    b = mask_words(ids, attn, vocab_size=VOCAB, mask_id=MASK, never_mask=(CLS, SEP, PAD),
                   generator=torch.Generator().manual_seed(5))
    c = mask_words(ids, attn, vocab_size=VOCAB, mask_id=MASK, never_mask=(CLS, SEP, PAD),
                   generator=torch.Generator().manual_seed(6))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[1], c[1])


def feat_batch(b=1024, n=36, f=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    # each row's features carry its image id in dim 0, its object index in dim 1
    feats = torch.rand(b, n, f, generator=g) + 1.0
    group = torch.randint(0, b // 2, (b,), generator=g)  # some images appear twice
    feats[:, :, 0] = group[:, None].float() + 10
    feats[:, :, 1] = torch.arange(n).float()
    return feats, group


@pytest.mark.parametrize("sync_free", [False, True])
def test_object_masking_statistics(sync_free):
    feats, group = feat_batch()
    out, fmask = mask_objects(feats, prob=0.15, generator=torch.Generator().manual_seed(2),
                              group_b=group, sync_free=sync_free)
    assert out.dtype == torch.float32 and fmask.dtype == torch.float32
    sel = fmask.bool()
    n_obj, n_sel = sel.numel(), int(sel.sum())
    assert abs(n_sel / n_obj - 0.15) < binom_tol(0.15, n_obj)
    assert torch.equal(out[~sel], feats[~sel])
    zeroed = (out == 0).all(-1) & sel
    same = (out == feats).all(-1) & sel
    replaced = sel & ~zeroed & ~same
    assert abs(zeroed.sum().item() / n_sel - 0.8) < binom_tol(0.8, n_sel)
    assert abs(replaced.sum().item() / n_sel - 0.1) < binom_tol(0.1, n_sel)
    assert abs(same.sum().item() / n_sel - 0.1) < binom_tol(0.1, n_sel) + 0.01
    # a replacement is a real object feature of ANOTHER image of the batch
    donor_img = out[replaced][:, 0] - 10
    own_img = group[:, None].expand_as(sel)[replaced].float()
    assert (donor_img != own_img).all()
    rows_b = torch.nonzero(replaced)[:, 0]
    for r, k in zip(rows_b[:50].tolist(), range(50)):
        v = out[replaced][k]
        match = (feats == v).all(-1)
        assert match.any() and (group[match.any(1)] != group[r]).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_object_masking_dense_equals_sparse_and_leaves_the_input(dtype):
    feats, group = feat_batch(256, f=8)
    feats = feats.to(dtype)
    before = feats.clone()
    a = mask_objects(feats, generator=torch.Generator().manual_seed(9), group_b=group,
                     sync_free=False)
    b = mask_objects(feats, generator=torch.Generator().manual_seed(9), group_b=group,
                     sync_free=True)
    assert a[0].dtype == b[0].dtype == torch.float32
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert a[1].sum() > 0 and not torch.equal(a[0], feats.float())    # something was masked
    assert torch.equal(feats, before)


def test_single_image_batch_falls_back_without_error():
    feats = torch.rand(4, 36, 3)
    out, m = mask_objects(feats, group_b=torch.zeros(4, dtype=torch.long),
                          generator=torch.Generator().manual_seed(0))
    assert out.shape == feats.shape and m.shape == (4, 36)


def raw_batch(b=16, L=20, n=36, f=16):
    ids, attn = word_batch(b, L)
    g = torch.Generator().manual_seed(3)
    return {
        "input_ids": ids, "attention_mask": attn, "token_type_ids": torch.zeros_like(ids),
        "visual_feats": torch.rand(b, n, f, generator=g).half(),
        "visual_pos": torch.rand(b, n, 4, generator=g),
        "obj_ids": torch.randint(0, 1600, (b, n), generator=g),
        "obj_conf": torch.rand(b, n, generator=g),
        "attr_ids": torch.randint(0, 400, (b, n), generator=g),
        "attr_conf": torch.rand(b, n, generator=g),
        "matched_label": torch.randint(0, 2, (b,), generator=g),
        "ans": torch.randint(-1, 5, (b,), generator=g),
        "img_index": torch.arange(b),
    }


def _check_contract(batch, b, L, n, f):
    assert set(batch) == {"input_ids", "attention_mask", "token_type_ids", "visual_feats",
                          "visual_pos", "labels", "obj_labels", "matched_label", "ans"}
    for k in ("input_ids", "attention_mask", "token_type_ids", "labels"):
        assert batch[k].shape == (b, L) and batch[k].dtype == torch.long, k
    assert batch["visual_feats"].shape == (b, n, f) and batch["visual_feats"].dtype == torch.float32
    assert batch["visual_pos"].shape == (b, n, 4) and batch["visual_pos"].dtype == torch.float32
    ol = batch["obj_labels"]
    assert set(ol) == {"obj", "attr", "feat"}
    assert ol["obj"][0].dtype == torch.long and ol["obj"][1].dtype == torch.float32
    assert ol["attr"][0].shape == (b, n) and ol["attr"][1].shape == (b, n)
    assert ol["feat"][0].shape == (b, n, f) and ol["feat"][0].is_floating_point()
    assert ol["feat"][1].shape == (b, n) and ol["feat"][1].dtype == torch.float32
    assert batch["matched_label"].shape == (b,) and batch["ans"].shape == (b,)


def test_mask_pretrain_batch_contract():
    raw = raw_batch()
    cfg = MaskingConfig(vocab_size=VOCAB, mask_id=MASK, never_mask=(CLS, SEP, PAD))
    batch = mask_pretrain_batch(raw, cfg, torch.Generator().manual_seed(0))
    _check_contract(batch, 16, 20, 36, 16)
    # the target is the unmasked features as stored (fp16, not copied); feat_mask marks the masked objects
    assert batch["obj_labels"]["feat"][0] is raw["visual_feats"]
    changed = (batch["visual_feats"] != raw["visual_feats"].float()).any(-1)
    assert not (changed & (batch["obj_labels"]["feat"][1] == 0)).any()


def test_selection_drawn_on_the_host_gives_the_counts_before_masking():
    """The trainer draws the selection on the host, counts what it selects there, and masks (on the device)
    with those draws: the counts are exactly what the masked batch holds, and the same draws mask alike."""
    raw = raw_batch()
    cfg = MaskingConfig(vocab_size=VOCAB, mask_id=MASK, never_mask=(CLS, SEP, PAD))
    draws = draw_selection(raw, torch.Generator().manual_seed(4))
    assert draws["u_words"].shape == (16, 20) and draws["u_objects"].shape == (16, 36)
    counts = selection_counts(raw, draws, cfg)
    a = mask_pretrain_batch({**raw, **draws}, cfg, torch.Generator().manual_seed(5))
    b = mask_pretrain_batch({**raw, **draws}, cfg, torch.Generator().manual_seed(6))  # other branch draws
    assert masked_counts(a) == masked_counts(b) == counts
    assert counts[0] > 0 and counts[1] > 0
    assert torch.equal(a["labels"], b["labels"])                                    # the same words selected
    assert torch.equal(a["obj_labels"]["feat"][1], b["obj_labels"]["feat"][1])        # the same objects
    with pytest.raises(ValueError, match="u_bl has shape"):
        mask_pretrain_batch({**raw, **draws, "u_words": draws["u_words"][:, :5]}, cfg)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_masking_on_cuda_matches_statistics():
    raw = {k: v.cuda() for k, v in raw_batch(b=2048, f=8).items()}
    cfg = MaskingConfig(vocab_size=VOCAB, mask_id=MASK, never_mask=(CLS, SEP, PAD))
    g = torch.Generator(device="cuda").manual_seed(0)
    batch = mask_pretrain_batch(raw, cfg, g)
    _check_contract(batch, 2048, 20, 36, 8)
    assert batch["input_ids"].is_cuda and batch["visual_feats"].is_cuda
    frac = batch["obj_labels"]["feat"][1].mean().item()
    assert abs(frac - 0.15) < 0.01
