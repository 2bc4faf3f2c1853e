"""Tokenisation, the sentence index, negatives, QA sampling, the sampler and the loader."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from lxmert_fast.data.answers import AnswerTable, convert_ans
from lxmert_fast.data.masking import IGNORE_INDEX
from lxmert_fast.data.pretrain_data import PretrainDataset, make_pretrain_loader, sample_answers
from lxmert_fast.data.sampler import ShardedResumableSampler
from lxmert_fast.data.tokenization import load_tokenizer, special_ids, tokenize_sentences


# --------------------------------------------------------------------------------------------
# tokenisation and the index
# --------------------------------------------------------------------------------------------

def test_tokenizer_from_local_vocab(demo_root, tmp_path):
    vocab = os.path.join(demo_root, "vocab.txt")
    tok = load_tokenizer(vocab)
    n_lines = sum(1 for _ in open(vocab))
    assert len(tok) == n_lines  # vocab= is honoured (vocab_file= would be ignored)
    sp = special_ids(tok)
    assert (sp.pad, sp.unk, sp.cls, sp.sep, sp.mask) == (0, 1, 2, 3, 4)
    long = " ".join(["red dog"] * 30)
    ids, lens = tokenize_sentences(tok, ["A Red dog.", long, "zebra"])
    assert ids.dtype == np.int32 and ids.shape == (3, 20) and lens.tolist()[1] == 20
    assert ids[0, 0] == sp.cls and ids[0, lens[0] - 1] == sp.sep and (ids[0, lens[0]:] == 0).all()
    assert ids[1, 0] == sp.cls and ids[1, 19] == sp.sep  # truncated: 18 pieces + [CLS] [SEP]
    assert tok.convert_ids_to_tokens(ids[0, 1:4].tolist()) == ["a", "red", "dog"]
    d = tmp_path / "tokdir"
    d.mkdir()
    (d / "vocab.txt").write_text(open(vocab).read())
    assert len(load_tokenizer(str(d))) == n_lines
    with pytest.raises(FileNotFoundError):
        load_tokenizer(str(tmp_path / "missing.txt"))


def test_index_matches_json(pretrain_ds, demo_root):
    ix, st = pretrain_ds.index, pretrain_ds.store
    tok = load_tokenizer(os.path.join(demo_root, "vocab.txt"))
    table = AnswerTable(os.path.join(demo_root, "lxmert", "all_ans.json"))
    assert ix.answers == table.answers
    i = 0
    for split in ("mscoco_train", "mscoco_nominival", "vgnococo"):
        for rec in json.load(open(os.path.join(demo_root, "lxmert", f"{split}.json"))):
            for src, sents in rec["sentf"].items():
                for j, s in enumerate(sents):
                    assert st.img_ids[ix.img_row[i]] == rec["img_id"]
                    n = ix.lengths[i]
                    assert ix.tokens[i, :n].tolist() == tok(s)["input_ids"][:20]
                    lo, hi = ix.qa_ptr[i], ix.qa_ptr[i + 1]
                    if src in rec["labelf"]:
                        want = {table.ans2id[convert_ans(a)]: sc
                                for a, sc in rec["labelf"][src][j].items()}
                        got = dict(zip(ix.qa_ans[lo:hi].tolist(), ix.qa_score[lo:hi].tolist()))
                        assert got.keys() == want.keys()
                        np.testing.assert_allclose(list(got.values()), [want[k] for k in got])
                    else:
                        assert lo == hi
                    i += 1
    assert i == len(ix)


# --------------------------------------------------------------------------------------------
# negatives and QA
# --------------------------------------------------------------------------------------------

def test_negatives_never_same_image_and_half(pretrain_ds):
    rng = np.random.default_rng(0)
    items = rng.integers(0, len(pretrain_ds), 40000)
    txt = pretrain_ds.sample_text(items, rng)
    img_row = pretrain_ds.index.img_row
    neg = txt["matched_b"] == 0
    assert abs(neg.mean() - 0.5) < 0.015
    assert (img_row[txt["sent_b"][neg]] != txt["img_b"][neg]).all()
    assert (txt["sent_b"][~neg] == items[~neg]).all()
    # negatives are drawn from all sentences: many distinct ones
    assert len(np.unique(txt["sent_b"][neg])) > 0.8 * len(pretrain_ds)
    # QA: none for negatives; matched QA items always get one of their own answers
    assert (txt["ans_b"][neg] == IGNORE_INDEX).all()
    ix = pretrain_ds.index
    has_qa = (ix.qa_ptr[items + 1] > ix.qa_ptr[items]) & ~neg
    assert (txt["ans_b"][has_qa] >= 0).all() and (txt["ans_b"][~has_qa] == IGNORE_INDEX).all()
    for k in np.flatnonzero(has_qa)[:200]:
        it = items[k]
        assert txt["ans_b"][k] in ix.qa_ans[ix.qa_ptr[it]:ix.qa_ptr[it + 1]]
    no_match = PretrainDataset(pretrain_ds.store, ix, task_matched=False)
    assert (no_match.sample_text(items[:1000], rng)["matched_b"] == 1).all()


def test_qa_sampling_proportional_to_score():
    # item 0: {a0: 0.9, a1: 0.3}; item 1: {a2: 1}; item 2: none; item 3: scores 0 -> uniform
    ptr = np.array([0, 2, 3, 3, 5])
    ans = np.array([10, 11, 12, 13, 14], np.int32)
    score = np.array([0.9, 0.3, 1.0, 0.0, 0.0], np.float32)
    n = 60000
    items = np.tile(np.arange(4), n // 4)
    use = np.ones(len(items), bool)
    use[::8] = False  # e.g. negatives
    out = sample_answers(np.random.default_rng(0), ptr, ans, score, items, use)
    assert (out[~use] == IGNORE_INDEX).all() and (out[items == 2] == IGNORE_INDEX).all()
    a0 = out[(items == 0) & use]
    assert set(np.unique(a0)) == {10, 11}
    assert abs((a0 == 10).mean() - 0.75) < 5 * (0.75 * 0.25 / len(a0)) ** 0.5
    assert (out[(items == 1) & use] == 12).all()
    a3 = out[(items == 3) & use]
    assert abs((a3 == 13).mean() - 0.5) < 0.03


# --------------------------------------------------------------------------------------------
# sampler
# --------------------------------------------------------------------------------------------

def _all(sampler):
    return [(r.indices.tolist(), r.seed) for r in sampler]


@pytest.mark.parametrize("n,ws,bs", [(1000, 4, 25), (1003, 4, 10), (37, 3, 4)])
def test_sampler_shards_disjoint_complete(n, ws, bs):
    per_rank = []
    for r in range(ws):
        s = ShardedResumableSampler(n, bs, rank=r, world_size=ws, seed=7, drop_last=False)
        idx = np.concatenate([np.array(b, int) for b, _ in _all(s)])
        assert len(idx) == s.per_rank == -(-n // ws) and len(list(s)) == len(s)
        per_rank.append(idx)
    allidx = np.concatenate(per_rank)
    assert set(allidx.tolist()) == set(range(n))       # complete
    assert len(allidx) - n == (-n) % ws               # only wrap-around padding repeats
    if n % ws == 0:                                    # disjoint
        assert len(np.unique(allidx)) == len(allidx)


def test_sampler_deterministic_and_epochs():
    a, b = ShardedResumableSampler(500, 16, seed=1), ShardedResumableSampler(500, 16, seed=1)
    assert _all(a) == _all(b)
    c = ShardedResumableSampler(500, 16, seed=2)
    assert _all(a) != _all(c)
    e0 = _all(a)
    a.set_epoch(1)
    assert _all(a) != e0
    a.set_epoch(0)
    assert _all(a) == e0
    assert len(a) == 500 // 16 and all(len(x) == 16 for x, _ in e0)


def test_sampler_resume_mid_epoch():
    full = ShardedResumableSampler(1000, 32, rank=1, world_size=2, seed=5)
    full.set_epoch(3)
    ref = _all(full)
    s = ShardedResumableSampler(1000, 32, rank=1, world_size=2, seed=5)
    s.set_epoch(3)
    it = iter(s)
    head = [next(it) for _ in range(5)]
    state = s.state_dict()
    assert state["position"] == 5 and state["epoch"] == 3
    t = ShardedResumableSampler(1000, 32, rank=1, world_size=2, seed=5)
    t.load_state_dict(json.loads(json.dumps(state)))
    t.set_epoch(3)  # the training loop calls this again: must not restart the epoch
    rest = _all(t)
    assert [(h.indices.tolist(), h.seed) for h in head] + rest == ref
    with pytest.raises(ValueError, match="batch_size"):
        ShardedResumableSampler(1000, 16, rank=1, world_size=2, seed=5).load_state_dict(state)


# --------------------------------------------------------------------------------------------
# loader
# --------------------------------------------------------------------------------------------

def _tensors(batch):
    return {k: v.clone() for k, v in batch.items() if torch.is_tensor(v)}


def test_loader_batches_and_resume(pretrain_ds):
    kw = dict(batch_size=16, seed=11, num_workers=2, prefetch_factor=2)
    ld = make_pretrain_loader(pretrain_ds, **kw)
    ld.set_epoch(2)
    ref = [_tensors(b) for b in ld]
    assert len(ref) == len(ld) == len(pretrain_ds) // 16
    b0 = ref[0]
    assert b0["input_ids"].shape == (16, 20) and b0["visual_feats"].shape == (16, 36, 2048)
    assert b0["visual_feats"].dtype == torch.float16 and b0["visual_pos"].dtype == torch.float32
    assert b0["ans"].dtype == torch.long and b0["matched_label"].dtype == torch.long
    # stop after k consumed batches (with prefetching in flight), resume in a new loader
    ld2 = make_pretrain_loader(pretrain_ds, **kw)
    ld2.set_epoch(2)
    got = []
    for i, b in enumerate(ld2):
        got.append(_tensors(b))
        if i == 4:
            state = ld2.state_dict()
            break
    assert state["position"] == 5
    ld3 = make_pretrain_loader(pretrain_ds, **kw)
    ld3.load_state_dict(state)
    ld3.set_epoch(2)
    got += [_tensors(b) for b in ld3]
    assert len(got) == len(ref)
    for x, y in zip(got, ref):
        assert x.keys() == y.keys()
        for k in x:
            assert torch.equal(x[k], y[k]), k
    # the same batches whatever the worker count
    ld0 = make_pretrain_loader(pretrain_ds, **{**kw, "num_workers": 0})
    ld0.set_epoch(2)
    for x, y in zip([_tensors(b) for b in ld0][:3], ref[:3]):
        assert all(torch.equal(x[k], y[k]) for k in x)


def test_loader_pins_memory_when_cuda(pretrain_ds):
    ld = make_pretrain_loader(pretrain_ds, batch_size=8, num_workers=0)
    assert ld.loader.pin_memory == torch.cuda.is_available()
    if torch.cuda.is_available():
        assert next(iter(ld))["visual_feats"].is_pinned()


def test_masking_in_workers_gives_model_batch(pretrain_ds):
    cfg = pretrain_ds.masking_config
    assert cfg.vocab_size == pretrain_ds.index.vocab_size and cfg.mask_id == 4
    ds = PretrainDataset(pretrain_ds.store, pretrain_ds.index, seed=3, masking=cfg)
    ld = make_pretrain_loader(ds, batch_size=32, num_workers=1, seed=0)
    b = next(iter(ld))
    assert b["visual_feats"].dtype == torch.float32 and b["labels"].shape == (32, 20)
    assert ((b["labels"] != IGNORE_INDEX) <= b["attention_mask"].bool()).all()
    assert b["obj_labels"]["feat"][1].shape == (32, 36)
    # a stock DataLoader with a plain batch_size works too (deterministic per index set)
    dl = torch.utils.data.DataLoader(pretrain_ds, batch_size=8, collate_fn=lambda x: x)
    assert next(iter(dl))["input_ids"].shape == (8, 20)
    one = pretrain_ds[5]
    assert one["input_ids"].shape == (20,) and one["visual_feats"].shape == (36, 2048)
