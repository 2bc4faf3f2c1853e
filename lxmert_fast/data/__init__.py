"""Data pipeline: original LXMERT files -> memory-mapped store -> batches -> masking.

Modules (imported on use, so ``python -m lxmert_fast.data.convert`` stays light):

* :mod:`~lxmert_fast.data.formats`   readers + strict validation of the original files
* :mod:`~lxmert_fast.data.store`     the memory-mapped feature store (:class:`FeatureStore`)
* :mod:`~lxmert_fast.data.store_root`  one store per feature file under a store root, found again
  by its source fingerprint (:func:`ensure_store`), shared by pre-training and the tasks
* :mod:`~lxmert_fast.data.store_set`   several stores read as one (:class:`StoreSet`)
* :mod:`~lxmert_fast.data.convert`   ``python -m lxmert_fast.data.convert TSV ... --out DIR``
* :mod:`~lxmert_fast.data.tsv_convert`  the TSV converter (parallel segments) and the row writing the
  other layouts share
* :mod:`~lxmert_fast.data.layouts`   the other tools' feature layouts (bottom-up-attention.pytorch
  ``.npz``, VL-T5 and bottom-up-attention-vqa HDF5, MMF / ViLBERT ``.npy`` and LMDB) into the same store
* :mod:`~lxmert_fast.data.tokenization`  WordPiece tokenisation, once, into int32 arrays
* :mod:`~lxmert_fast.data.answers`   the QA answer table (``all_ans.json``)
* :mod:`~lxmert_fast.data.pretrain_data`  items, negatives, QA labels, the pre-training loader
* :mod:`~lxmert_fast.data.sampler`, :mod:`~lxmert_fast.data.step_sampler`  the resumable batch samplers
  (sharded; training's world-size-invariant steps)
* :mod:`~lxmert_fast.data.loader`    the resumable loader pre-training and the tasks share
* :mod:`~lxmert_fast.data.masking`   vectorised word / object masking (any device)
* :mod:`~lxmert_fast.data.demo`      ``python -m lxmert_fast.data.demo --out DIR``
"""

import importlib

_EXPORTS = {
    "DataFormatError": "formats", "BadRowLog": "formats",
    "FeatureStore": "store", "StoreError": "store",
    "ensure_store": "store_root", "find_store": "store_root", "StoreSet": "store_set",
    "convert_tsvs": "tsv_convert",
    "load_tokenizer": "tokenization", "tokenize_sentences": "tokenization",
    "AnswerTable": "answers",
    "PretrainIndex": "pretrain_data", "PretrainDataset": "pretrain_data",
    "ShardedResumableSampler": "sampler", "ResumableLoader": "loader",
    "build_pretrain_index": "pretrain_data", "build_pretrain_dataset": "pretrain_data",
    "make_pretrain_loader": "pretrain_data",
    "MaskingConfig": "masking", "mask_words": "masking", "mask_objects": "masking",
    "mask_pretrain_batch": "masking",
    "ensure_demo_data": "demo",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    mod = _EXPORTS.get(name)
    if mod is None:
        raise AttributeError(f"module 'lxmert_fast.data' has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{mod}"), name)
