"""Fixtures of the data tests: a small demo world, a store of its pre-training files converted
together (the converter's tests), a store root of one store per file and the pre-training dataset
read from it.

Everything is generated here (nothing downloaded) and shared by the whole session.
"""

from __future__ import annotations

import os

import pytest

from lxmert_fast.data.tsv_convert import convert_tsvs
from lxmert_fast.data.demo import generate
from lxmert_fast.data.pretrain_data import build_pretrain_dataset, feature_files_for
from lxmert_fast.data.store import FeatureStore

DEMO_IMAGES = 96


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory) -> str:
    root = str(tmp_path_factory.mktemp("demo") / "data")
    generate(root, images=DEMO_IMAGES, seed=1, log=None)
    return root


@pytest.fixture(scope="session")
def pretrain_tsvs(demo_root) -> list[str]:
    return feature_files_for(demo_root, "mscoco_train,mscoco_nominival,vgnococo")


@pytest.fixture(scope="session")
def demo_store(demo_root, pretrain_tsvs, tmp_path_factory) -> FeatureStore:
    out = str(tmp_path_factory.mktemp("store") / "store")
    convert_tsvs(pretrain_tsvs, out, workers=1, progress=False, log=None)
    return FeatureStore.open(out, verify=True)


@pytest.fixture(scope="session")
def store_root(tmp_path_factory) -> str:
    """A store root outside the demo root: one store per feature file, as the jobs keep them."""
    return str(tmp_path_factory.mktemp("stores") / "root")


@pytest.fixture(scope="session")
def pretrain_ds(demo_root, store_root):
    return build_pretrain_dataset(demo_root, store_dir=store_root, seed=3, log=None)


def tsv_lines(path: str) -> list[bytes]:
    with open(path, "rb") as f:
        return f.read().splitlines(keepends=True)


def write_lines(path: str, lines: list[bytes]) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.writelines(lines)
    return path
