from setuptools import find_packages, setup

setup(
    name="lxmert-fast",
    version="0.1.0",
    description="Fast LXMERT pre-training and fine-tuning (exact model, DeepSpeed, Triton kernels)",
    # ds_configs/ (the repository's top level, the one source of the DeepSpeed configs) ships as lxmert_fast.ds_configs
    packages=find_packages(include=["lxmert_fast", "lxmert_fast.*"]) + ["lxmert_fast.ds_configs"],
    package_dir={"lxmert_fast.ds_configs": "ds_configs"},
    package_data={"lxmert_fast.ds_configs": ["*.json"]},
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4",
        "numpy",
        # the models are transformers PreTrainedModels loading through its weight conversions
        # (transformers.core_model_loading, PretrainedConfig as a strict dataclass): transformers 5; tested on 5.17 and 5.25
        "transformers>=5.17",
        "safetensors",
        "tokenizers",
        "deepspeed>=0.14",
        "tqdm",
    ],
    extras_require={
        "kernels": ["triton>=3.0"],
        # h5py and lmdb: region features in the other tools' layouts (docs/data.md)
        "formats": ["h5py", "lmdb"],
        # wandb and comet_ml: the W&B and Comet monitors' offline runs in tests/test_monitors.py;
        # h5py and lmdb: every feature layout is tested (tests/data/test_layouts.py);
        # accelerate and peft: transformers' Trainer and a LoRA adapter on our models in tests/test_transformers_api.py;
        # pytest-xdist: the suite on every core (-n auto --dist loadfile, docs/testing.md)
        "dev": ["pytest", "pytest-xdist", "tensorboard", "wandb", "comet_ml", "h5py", "lmdb", "accelerate", "peft"],
    },
    entry_points={"console_scripts": []},
)
