"""Two "nodes" on this machine form one world, as clusters without ssh (SLURM, Kubernetes) launch DeepSpeed.

A hostfile `node0 slots=1` / `node1 slots=1` and two launchers in DeepSpeed's no-ssh mode
(`deepspeed --hostfile H --no_ssh --node_rank 0|1 --master_addr 127.0.0.1 --master_port P ...`), CPU, gloo:
- shared storage (one --cache_dir): the demo world, its feature stores and its tokenised sentences are built
  once, by rank 0; node 1 finds them; no half-written directory is ever left or read;
- a disk of its own per node (a --cache_dir each): each node's first process builds its node's copy.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from lxmert_fast.data.demo import JOBS_OBJECTS, demo_dir_name
from tests.helpers import child_env, free_port

pytestmark = pytest.mark.slow  # multi-process or CLI runs: out of the quick subset

WORLD = demo_dir_name(240, 0, JOBS_OBJECTS)  # the jobs' demo world (--demo_images 240, no --demo_objects)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _launch(tmp_path, caches: tuple[str, str], port: int) -> list[str]:
    deepspeed = os.path.join(os.path.dirname(sys.executable), "deepspeed")
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node0 slots=1\nnode1 slots=1\n")
    env = child_env()
    env.update(PYTHONPATH=REPO + os.pathsep + env.get("PYTHONPATH", ""), DS_ACCELERATOR="cpu",
               CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)
    procs = []
    for node, cache in enumerate(caches):
        cmd = [deepspeed, "--hostfile", str(hostfile), "--no_ssh", "--node_rank", str(node), "--master_addr",
               "127.0.0.1", "--master_port", str(port), os.path.join(REPO, "lxmert_fast", "pretrain.py"),
               "--model", "tiny", "--max_steps", "2", "--log_every", "1", "--no_progress", "--demo_images", "240",
               "--cache_dir", cache, "--grounding_eval", "no", "--no_export", "--eval_every", "0", "--eval_batches",
               "1", "--num_workers", "0", "--micro_batch_size", "8", "--output_dir", str(tmp_path / f"run{node}")]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                      cwd=str(tmp_path)))
    logs = []
    for p in procs:
        out, _ = p.communicate(timeout=900)
        logs.append(out)
        assert p.returncode == 0, out[-5000:]
    return logs


def _tree(root: str) -> list[str]:
    return sorted(os.path.relpath(os.path.join(d, n), root) for d, dirs, files in os.walk(root) for n in dirs)


def test_two_nodes_on_shared_storage_build_the_caches_once(tmp_path):
    cache = str(tmp_path / "shared")
    node0, node1 = _launch(tmp_path, (cache, cache), free_port())
    assert "2 process(es)" in node0 and "step 2/2" in node0
    assert node0.count("demo world: 240 pre-training images") == 1
    assert node0.count("converted ") == 3                  # train2014, val2014, vg_gqa: each once
    dirs = _tree(cache)
    assert [d for d in dirs if "partial" in d] == []       # nothing half-written left behind
    worlds = [d for d in dirs if os.sep not in d]
    assert worlds == [WORLD], worlds
    stores = sorted(d for d in dirs if os.path.basename(d).startswith("store-") and d.count(os.sep) == 2)
    assert [os.path.basename(d) for d in stores] == ["store-train2014", "store-val2014", "store-vg_gqa"], dirs


def test_two_nodes_with_disks_of_their_own_build_one_copy_each(tmp_path):
    caches = (str(tmp_path / "disk0"), str(tmp_path / "disk1"))
    node0, _ = _launch(tmp_path, caches, free_port())
    assert "2 process(es)" in node0 and "step 2/2" in node0
    for cache in caches:
        dirs = _tree(cache)
        assert WORLD in dirs and [d for d in dirs if "partial" in d] == [], dirs
        assert os.path.isdir(os.path.join(cache, WORLD, "lxmert_fast", "store-train2014"))


def test_a_job_script_leaves_its_process_group_after_success_only(monkeypatch):
    """The scripts' __main__ (train.entry.exit_script): after success every rank waits for the
    others and takes the group down before exiting, so no rank leaves while a peer still needs it
    (the rank-0 store going away under a finishing peer aborted that peer at exit once: rc -6);
    after a failure no rank waits for peers that may never arrive."""
    from lxmert_fast.train import entry, process

    left = []
    monkeypatch.setattr(process, "leave_process_group", lambda wait=True: left.append(wait))
    # 75, a stop on a signal: taken down without a barrier (an agreed stop has passed one; a stop outside
    # the training loop may have peers that never arrive)
    for code, leaves in ((0, [True]), (2, []), (3, []), (75, [False])):
        left.clear()
        with pytest.raises(SystemExit) as ended:
            entry.exit_script(lambda code=code: code)
        assert ended.value.code == code and left == leaves, (code, left)


def test_leaving_the_process_group_takes_it_down(tmp_path):
    """leave_process_group in a real (one-process, gloo) group: barrier, then destroyed; a process
    without a group passes through it."""
    code = (
        "import torch.distributed as dist\n"
        "from lxmert_fast.train.process import leave_process_group\n"
        "leave_process_group()\n"
        f"dist.init_process_group('gloo', init_method='file://{tmp_path / 'store'}', rank=0, world_size=1)\n"
        "assert dist.is_initialized()\n"
        "leave_process_group()\n"
        "assert not dist.is_initialized()\n"
        "print('left')\n")
    env = child_env()
    env.update(PYTHONPATH=REPO + os.pathsep + env.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "left" in out.stdout, out.stdout + out.stderr
