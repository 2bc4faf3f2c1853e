"""What one Triton compilation is: a kernel launch specialised as Triton's CUDA launcher does it.

A launch of a ``@triton.jit`` kernel compiles once per *specialisation*: the kernel, the type of
every argument (a pointer's dtype), the constexprs, each integer equal to 1 turned into a
constexpr, each pointer 16-byte aligned and each integer divisible by 16 marked so
(``do_not_specialize`` respected), and the launch options (warps, stages). ``specialise`` computes
it from a launch's arguments with Triton's own ``native_specialize_impl``; ``launch_row`` /
``row_key`` turn it into a JSON row and its identity; ``build_inputs`` turns a row back into what
``triton.compile(ASTSource(...))`` takes.

Works on kernels compiled or interpreted (``TRITON_INTERPRET=1``): an interpreted kernel's
parameters are read from a ``JITFunction`` built around the same Python function. Needs Triton's
CUDA backend (it ships in the triton wheel); no GPU.
"""
from __future__ import annotations

import functools
import inspect
import json

from triton._C.libtriton import native_specialize_impl
from triton.backends.nvidia.compiler import CUDABackend
from triton.runtime.jit import JITFunction

DEFAULT_OPTIONS = {"num_warps": 4, "num_stages": 3}  # Triton's CUDA defaults


@functools.lru_cache(maxsize=None)
def _params_of_fn(fn, do_not_specialize, do_not_specialize_on_alignment):
    return JITFunction(fn, do_not_specialize=list(do_not_specialize),
                       do_not_specialize_on_alignment=list(do_not_specialize_on_alignment)).params


def kernel_params(kernel):
    """The ``KernelParam`` list of a compiled (``JITFunction``) or interpreted kernel."""
    if isinstance(kernel, JITFunction):
        return kernel.params
    kwargs = getattr(kernel, "kwargs", {})  # InterpretedFunction keeps the decorator's arguments
    return _params_of_fn(kernel.fn, tuple(kwargs.get("do_not_specialize") or ()),
                         tuple(kwargs.get("do_not_specialize_on_alignment") or ()))


def specialise(params, args, kwargs):
    """(signature, constexprs by index, attrs by index, options) as Triton's launcher builds them."""
    names = [p.name for p in params]
    bound = dict(zip(names, args))
    bound.update({k: v for k, v in kwargs.items() if k in names})
    signature, constexprs, attrs = {}, {}, {}
    for i, p in enumerate(params):
        value = bound[p.name] if p.name in bound else p.default
        if p.is_constexpr:
            signature[p.name] = "constexpr"
            constexprs[(i,)] = value
            continue
        ty, key = native_specialize_impl(CUDABackend, value, False, not p.do_not_specialize,
                                         not p.do_not_specialize_on_alignment)
        signature[p.name] = ty
        if ty == "constexpr":
            constexprs[(i,)] = key
        elif isinstance(key, str):
            attrs[(i,)] = CUDABackend.parse_attr(key)
    options = {k: kwargs.get(k, v) for k, v in DEFAULT_OPTIONS.items()}
    return signature, constexprs, attrs, options


def _plain(value):
    """A constexpr value as JSON (tl.constexpr unwrapped; dtypes and the like by name)."""
    value = getattr(value, "value", value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def launch_row(kernel, args, kwargs) -> dict:
    """One launch as a JSON-able row: the kernel (name, module, file) and its specialisation."""
    params = kernel_params(kernel)
    signature, constexprs, attrs, options = specialise(params, args, kwargs)
    fn = kernel.fn
    return dict(kernel=fn.__name__, module=fn.__module__, file=inspect.getsourcefile(fn), signature=signature,
                constexprs={params[i[0]].name: _plain(v) for i, v in constexprs.items()},
                attrs={params[i[0]].name: [list(a) for a in v] for i, v in attrs.items()}, options=options)


def row_key(row) -> str:
    """The identity of a row's compilation (same key: one compilation serves both launches)."""
    return json.dumps([row["module"], row["kernel"], row["signature"], row["constexprs"], row["attrs"],
                       row["options"]], sort_keys=True)


def build_inputs(kernel, row):
    """(signature, constexprs, attrs, options) of ``row`` for ``ASTSource`` / ``triton.compile``, for the
    compiled ``kernel`` the row names."""
    index = {p.name: (i,) for i, p in enumerate(kernel.params)}
    constexprs = {index[name]: value for name, value in row["constexprs"].items()}
    attrs = {index[name]: [tuple(a) for a in value] for name, value in row["attrs"].items()}
    return dict(row["signature"]), constexprs, attrs, dict(row["options"])
