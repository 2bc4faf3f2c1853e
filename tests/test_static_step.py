"""The training step as one static graph: budgeted masked rows, no host sync, torch.compile end to end.

- Row budgets: room for the expected masked rows plus 6 standard deviations; rows gathered with a
  static-size index give the same losses and gradients as the exact selection; a batch beyond its budget
  fails loudly (never a silent truncation) and `RowBudget.full` gives it the exact loss.
- The model's training step (forward and backward, all five tasks, dropout on) reads nothing back to the
  host: every op that would (`item`, `nonzero`, `bool(tensor)`, ...) raises inside it.
- `torch.compile(model, fullgraph=True)` in training mode with labels: batches of one shape whose masked
  words and objects differ in number and place run with no graph break and no recompilation, and give
  the uncompiled model's loss and gradients.
"""

from __future__ import annotations

import contextlib
import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from lxmert_fast import LxmertConfig, LxmertForPreTraining
from lxmert_fast.model.rows import RowBudget, binomial_budget, select_rows
from tests.helpers import assert_close_scaled, kernel_device, no_dropout, random_batch, random_labels, to_device

CONFIG = LxmertConfig.preset("tiny", hidden_size=48, num_attention_heads=3, intermediate_size=80,
                             l_layers=2, x_layers=2, r_layers=1, num_qa_labels=5)
SHAPE = dict(batch=4, tokens=9, objects=11)
BUDGET = RowBudget.for_batch(4, 9, 11, word_rate=0.4, obj_rate=0.3)  # random_labels masks at 0.4 / 0.3


def _batches(n: int, config=CONFIG):
    """Batches of one shape whose masked words and objects differ in number and place."""
    out = []
    for i in range(n):
        g = torch.Generator().manual_seed(100 + i)
        inputs = random_batch(config, batch=SHAPE["batch"], tokens=SHAPE["tokens"], objects=SHAPE["objects"],
                              lengths=[9, 1 + i, 5, 7], generator=g)
        labels = random_labels(config, inputs, generator=g)
        out.append((inputs, labels))
    counts = {(int((lab["labels"] >= 0).sum()), int(lab["obj_labels"]["feat"][1].sum())) for _, lab in out}
    assert len(counts) == n, f"the batches must mask different numbers of rows: {counts}"
    return out


def _step(model, inputs, labels, params_of=None, **kwargs):
    params_of = params_of or model
    params_of.zero_grad(set_to_none=True)
    out = model(**inputs, **labels, **kwargs)
    out.loss.backward()
    return out, {name: p.grad.detach().clone() for name, p in params_of.named_parameters() if p.grad is not None}


def _assert_same(a, b, what, rel=1e-5):
    (out_a, grads_a), (out_b, grads_b) = a, b
    assert set(out_a.losses) == set(out_b.losses) == {"mlm", "matched", "obj", "attr", "feat", "qa"}
    for name in out_b.losses:
        assert_close_scaled(out_a.losses[name], out_b.losses[name], f"{what}: loss {name}", rel=rel)
    assert set(grads_a) == set(grads_b)
    for name, ref in grads_b.items():
        assert_close_scaled(grads_a[name], ref, f"{what}: grad {name}", rel=rel)


# ---------------------------------------------------------------------------------------------- budgets
def test_budget_is_mean_plus_six_sigma_aligned_and_capped():
    n, p = 256 * 20, 0.15
    budget = binomial_budget(n, p, 6.0)
    assert budget % 8 == 0
    assert n * p + 6 * math.sqrt(n * p * (1 - p)) <= budget < n * p + 6 * math.sqrt(n * p * (1 - p)) + 8
    assert binomial_budget(10, 0.9, 6.0) == 10  # never more than every row
    assert RowBudget.for_batch(256, 20, 36) == RowBudget(binomial_budget(5120, 0.15, 6), binomial_budget(9216, 0.15, 6))
    assert RowBudget.full(2, 3, 4) == RowBudget(6, 8)
    assert RowBudget(5, 5).fits(5, 0) and not RowBudget(5, 5).fits(6, 0)
    with pytest.raises(ValueError, match="must be >= 0"):
        RowBudget(-1, 0)


def test_static_rows_are_the_exact_rows_then_padding():
    keep = torch.tensor([0, 1, 1, 0, 0, 1, 0], dtype=torch.bool)
    exact, valid = select_rows(keep, None, "t")
    assert exact.tolist() == [1, 2, 5] and valid is None
    rows, valid = select_rows(keep, 5, "t")
    assert rows.tolist() == [1, 2, 5, 0, 0] and valid.tolist() == [True, True, True, False, False]
    rows, valid = select_rows(torch.zeros(4, dtype=torch.bool), 2, "t")
    assert rows.tolist() == [0, 0] and valid.tolist() == [False, False]
    with pytest.raises(RuntimeError, match="more masked rows than the static row budget"):
        select_rows(keep, 2, "masked words")


# ---------------------------------------------------------------------------------------------- exactness
@pytest.mark.parametrize("backend", ["eager", "sdpa"])
def test_budgeted_rows_give_the_exact_losses_and_gradients(backend):
    """Static room (with unused slots), room for every row, and the content-sized selection agree with
    the full computation (every row decoded)."""
    model = LxmertForPreTraining(no_dropout(CONFIG)).train()
    model.set_attention_backend(backend)
    for inputs, labels in _batches(2):
        ref = _step(model, inputs, labels, output_hidden_states=True)   # every row computed
        for budget in (BUDGET, RowBudget.full(4, 9, 11), None):
            _assert_same(_step(model, inputs, labels, row_budget=budget), ref, f"budget {budget}")


def test_a_batch_beyond_its_budget_fails_loudly_and_full_room_gives_its_exact_loss():
    model = LxmertForPreTraining(no_dropout(CONFIG)).train()
    inputs, labels = _batches(1)[0]
    labels["labels"] = torch.where(inputs["attention_mask"].bool(), inputs["input_ids"], -100)  # every word
    labels["obj_labels"]["feat"][1].fill_(1.0)                                                   # every object
    tight = RowBudget.for_batch(4, 9, 11, word_rate=0.15, obj_rate=0.15)
    assert not tight.fits(int((labels["labels"] >= 0).sum()), 44)
    with pytest.raises(RuntimeError, match="more masked rows than the static row budget"):
        model(**inputs, **labels, row_budget=tight)
    with pytest.raises(RuntimeError, match="masked objects"):
        model(**inputs, **labels, row_budget=RowBudget(words=36, objects=tight.objects))
    ref = _step(model, inputs, labels, output_hidden_states=True)
    _assert_same(_step(model, inputs, labels, row_budget=RowBudget.full(4, 9, 11)), ref, "full room")


# ---------------------------------------------------------------------------------------------- no host sync
class HostSyncError(AssertionError):
    pass


class _NoHostReads(TorchDispatchMode):
    """Raises on every aten op that reads a tensor's value back to the host or sizes its output by the
    tensor's content (`item`, `bool(t)`, `int(t)`, `nonzero`, boolean-mask indexing, `unique` ...)."""

    FORBIDDEN = ("_local_scalar_dense", "nonzero", "nonzero_numpy", "masked_select", "_unique", "_unique2",
                 "unique_dim", "unique_consecutive", "repeat_interleave", "equal", "is_nonzero", "allclose",
                 "item")
    INDEXING = ("index", "index_put", "index_put_", "_index_put_impl_")

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name.split("::")[-1]
        if name in self.FORBIDDEN:
            raise HostSyncError(f"{func} reads a device value back to the host")
        if name in self.INDEXING and any(isinstance(i, torch.Tensor) and i.dtype == torch.bool
                                         for i in (args[1] if len(args) > 1 else ())):
            raise HostSyncError(f"{func} with a boolean mask sizes its output by the mask's content")
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def no_host_reads():
    """The guard, plus the two reads that bypass the dispatcher (`tolist`, `numpy`)."""
    def refuse(*args, **kwargs):
        raise HostSyncError("tolist/numpy read a device value back to the host")

    saved = torch.Tensor.tolist, torch.Tensor.numpy
    torch.Tensor.tolist = torch.Tensor.numpy = refuse
    try:
        with _NoHostReads():
            yield
    finally:
        torch.Tensor.tolist, torch.Tensor.numpy = saved


def test_the_guard_catches_host_reads():
    x = torch.ones(3)
    for read in (lambda: x.sum().item(), lambda: bool(x.sum()), lambda: x.nonzero(), lambda: x[x > 0],
                 lambda: x.tolist(), lambda: int(x[0])):
        with pytest.raises(HostSyncError), no_host_reads():
            read()


@pytest.mark.parametrize("backend", ["eager", "sdpa"])
def test_the_training_step_reads_nothing_back_to_the_host(backend):
    """Forward and backward with labels for all five tasks, dropout on, a row budget: no op in it reads a
    value back to the host (the masked rows, the losses' means, the masks are all computed on the device)."""
    model = LxmertForPreTraining(CONFIG).train()
    model.set_attention_backend(backend)
    inputs, labels = _batches(1)[0]
    inputs["visual_attention_mask"] = torch.ones(4, 11, dtype=torch.long)
    inputs["visual_attention_mask"][2, 6:] = 0
    with no_host_reads():
        out = model(**inputs, **labels, row_budget=BUDGET)
        out.loss.backward()
    assert torch.isfinite(out.loss)
    assert [name for name, p in model.named_parameters() if p.grad is None] == []


# ---------------------------------------------------------------------------------------------- torch.compile
@pytest.mark.parametrize("backend", ["eager", "sdpa"])
def test_compiled_training_step_has_no_graph_break_no_recompile_and_the_same_results(backend):
    """torch.compile(model, fullgraph=True, dynamic=False), training mode, all five tasks, dropout on: three
    batches of one shape whose masked rows differ in number and place are captured once, as one graph, and
    give the eager model's loss and gradients.

    The compiler backend here is AOTAutograd (`aot_eager`): the same capture, functionalisation and
    forward/backward graphs inductor receives, without inductor's C++ build (1-4 minutes per graph on this
    CPU). Inductor itself runs end to end in the `--compile default` tests of pre-training and fine-tuning.
    """
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    model = LxmertForPreTraining(CONFIG).train()
    model.set_attention_backend(backend)
    compiled = torch.compile(model, fullgraph=True, dynamic=False, backend="aot_eager")
    for i, (inputs, labels) in enumerate(_batches(3)):
        torch.manual_seed(1000 + i)
        got = _step(compiled, inputs, labels, params_of=model, row_budget=BUDGET)
        torch.manual_seed(1000 + i)
        ref = _step(model, inputs, labels, row_budget=BUDGET)
        _assert_same(got, ref, f"batch {i}")
    assert dict(counters["graph_break"]) == {}
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    assert not counters["recompiles"], dict(counters["recompiles"])
    torch._dynamo.reset()


@pytest.mark.slow
@pytest.mark.gpu
def test_compiled_step_with_the_triton_kernels_has_no_graph_break():
    """The Triton attention backend and fused ops (custom ops; on CUDA, else in the interpreter) inside the
    compiled step: captured as one graph, with the eager model's loss and gradients (dropout seeds are device
    tensors drawn inside the step, the same stream in both). One batch: the interpreter runs each kernel
    program in Python."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    device = kernel_device()
    config = CONFIG.replace(hidden_size=32, num_attention_heads=2, intermediate_size=48, l_layers=1, x_layers=1,
                            r_layers=1)  # head dim 16; one layer each: the interpreter is slow
    model = LxmertForPreTraining(config).train().to(device)
    model.set_attention_backend("triton")
    model.set_kernels("triton")
    compiled = torch.compile(model, fullgraph=True, dynamic=False, backend="aot_eager")
    for i, (inputs, labels) in enumerate(to_device(_batches(2, config)[:1], device)):
        torch.manual_seed(2000 + i)
        got = _step(compiled, inputs, labels, params_of=model, row_budget=BUDGET)
        torch.manual_seed(2000 + i)
        ref = _step(model, inputs, labels, row_budget=BUDGET)
        _assert_same(got, ref, f"triton, batch {i}", rel=1e-4)
    assert dict(counters["graph_break"]) == {}
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    torch._dynamo.reset()
