"""One pre-training step of ours against transformers' LxmertForPreTraining, in the same process.

    python bench/step_vs_hf.py [--batch 32] [--preset base] [--repeats 7] [--backend sdpa] [--json OUT]

Both models get the same weights and the same batch (20 tokens, 36 objects, pre-training
masking: 15% of words, 15% of objects, half the pairs mismatched). A step is forward + backward
of the summed loss (no optimizer). The two are timed alternately (ours, HF, ours, HF ...) after
a warm-up, and the medians are compared. Prints both times and the ratio HF / ours.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import transformers  # noqa: E402

from bench._common import append_row, git_commit  # noqa: E402
from lxmert_fast import LxmertConfig, LxmertForPreTraining  # noqa: E402
from lxmert_fast.model.convert import hf_to_ours, load_state_into  # noqa: E402


def pretraining_batch(config: LxmertConfig, batch: int, tokens: int = 20, objects: int = 36, seed: int = 0) -> dict:
    """A random batch shaped and masked like LXMERT pre-training."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(6, tokens + 1, (batch,), generator=g)
    attention_mask = (torch.arange(tokens)[None] < lengths[:, None]).long()
    low = min(1000, config.vocab_size // 2)  # past BERT's special / unused ids; small vocabularies too
    input_ids = torch.randint(low, config.vocab_size, (batch, tokens), generator=g) * attention_mask
    word_pick = (torch.rand(batch, tokens, generator=g) < 0.15) & attention_mask.bool()
    labels = torch.where(word_pick, input_ids, torch.full_like(input_ids, -100))
    feats = torch.randn(batch, objects, config.visual_feat_dim, generator=g).relu()
    feat_mask = (torch.rand(batch, objects, generator=g) < 0.15).float()
    matched = torch.randint(0, 2, (batch,), generator=g)
    ans = torch.randint(0, config.num_qa_labels, (batch,), generator=g)
    ans[matched == 0] = -100
    return dict(
        input_ids=input_ids, attention_mask=attention_mask, token_type_ids=torch.zeros_like(input_ids),
        visual_feats=feats * (1 - feat_mask[..., None]), visual_pos=torch.rand(batch, objects, 4, generator=g),
        labels=labels, matched_label=matched, ans=ans,
        obj_labels={
            "obj": (torch.randint(0, config.num_object_labels, (batch, objects), generator=g), torch.rand(batch, objects, generator=g)),
            "attr": (torch.randint(0, config.num_attr_labels, (batch, objects), generator=g), torch.rand(batch, objects, generator=g)),
            "feat": (feats, feat_mask),
        },
    )


def step(model, batch) -> float:
    start = time.perf_counter()
    loss = model(**batch).loss
    loss.backward()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def peer_and_ours(preset: str, backend: str):
    """(our config, transformers' LxmertForPreTraining, ours), both in train mode with the same weights
    (the peer's random initialisation, seed 0, converted into ours)."""
    torch.manual_seed(0)
    config = LxmertConfig.preset(preset, attention_backend=backend)
    hf = transformers.LxmertForPreTraining(
        transformers.LxmertConfig(**{k: getattr(config, k) for k in config.hf_field_names()})
    ).train()
    ours = LxmertForPreTraining(config).train()
    load_state_into(ours, hf_to_ours(hf.state_dict(), config), "hf")
    return config, hf, ours


def run(batch: int = 32, preset: str = "base", repeats: int = 7, backend: str = "sdpa") -> dict:
    config, hf, ours = peer_and_ours(preset, backend)
    data = pretraining_batch(config, batch)
    for _ in range(2):  # warm-up
        step(ours, data), step(hf, data)
    ours_times, hf_times = [], []
    for _ in range(repeats):
        ours_times.append(step(ours, data))
        hf_times.append(step(hf, data))
    ours_s, hf_s = statistics.median(ours_times), statistics.median(hf_times)
    return {
        "what": "pretraining step fwd+bwd, fp32", "preset": preset, "batch": batch, "tokens": 20, "objects": 36,
        "backend": backend, "ours_s": ours_s, "hf_s": hf_s, "speedup": hf_s / ours_s,
        "ours_samples_per_s": batch / ours_s, "hf_samples_per_s": batch / hf_s,
        "device": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
        "torch": torch.__version__, "transformers": transformers.__version__, "commit": git_commit(),
    }


def parse_step_args(doc: str, batch: int, repeats: int) -> argparse.Namespace:
    """The command line the one-step comparisons share."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=batch)
    parser.add_argument("--preset", default="base", choices=["base", "small", "tiny"])
    parser.add_argument("--repeats", type=int, default=repeats)
    parser.add_argument("--backend", default="sdpa")
    parser.add_argument("--json", help="append the result as a JSON line to this file")
    return parser.parse_args()


def main() -> None:
    args = parse_step_args(__doc__, batch=32, repeats=7)
    row = run(args.batch, args.preset, args.repeats, args.backend)
    if args.json:
        append_row(args.json, row)
    print(f"{'model':<14}{'step (s)':>10}{'samples/s':>11}")
    print(f"{'transformers':<14}{row['hf_s']:>10.3f}{row['hf_samples_per_s']:>11.1f}")
    print(f"{'lxmert-fast':<14}{row['ours_s']:>10.3f}{row['ours_samples_per_s']:>11.1f}")
    print(f"speed-up (HF / ours): {row['speedup']:.3f}x  [{args.preset}, batch {args.batch}, {args.backend}, "
          f"{row['threads']} threads, commit {row['commit'][:12]}]")


if __name__ == "__main__":
    main()
