"""``Module`` and the layers of ``onnxgrad.nn``, with PyTorch's names, defaults and init."""
from __future__ import annotations

import itertools
import math
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np

from ..tracer import state
from ..tracer.autograd import zero_grads
from ..tracer.conversions import parse_to
from ..tracer.device import check
from ..tracer.dtypes import as_dtype
from ..tracer.factories import generator
from ..tracer.ops import ShapeError
from ..tracer.tensor import Tensor, Val, _contig, get_default_dtype
from . import functional as F
from . import init


class Parameter(Tensor):
    """A leaf tensor that a :class:`Module` registers as trainable."""

    __slots__ = ()

    def __init__(self, data: Any = None, requires_grad: bool = True):
        if data is None:
            array = np.zeros((0,), get_default_dtype())
        elif isinstance(data, Tensor):
            array = np.array(data._v.data, copy=True)
        else:
            array = np.array(data, copy=True)
        super().__init__(Val(_contig(array)))
        if requires_grad:
            self.requires_grad_(True)

    def __repr__(self) -> str:
        return "Parameter containing:\n" + super().__repr__()

    __str__ = __repr__

    def __repr__(self) -> str:
        return "Parameter containing:\n" + super().__repr__()


_calls: list[tuple[Module, str]] = []  # the modules being called, with their qualified paths


class RemovableHandle:
    """What ``register_forward_hook`` returns: ``remove()`` unregisters the hook (PyTorch's
    ``torch.utils.hooks.RemovableHandle``, also a context manager)."""

    _ids = itertools.count()

    def __init__(self, hooks: OrderedDict) -> None:
        self.hooks_dict_ref = hooks
        self.id = next(RemovableHandle._ids)

    def remove(self) -> None:
        if self.hooks_dict_ref.pop(self.id, None) is not None:
            state.structure_changed()

    def __enter__(self) -> RemovableHandle:  # noqa: PYI034
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


class Module:
    """Base class of layers and models, like ``torch.nn.Module``."""

    def __init__(self) -> None:
        object.__setattr__(self, "_parameters", OrderedDict())
        object.__setattr__(self, "_buffers", OrderedDict())
        object.__setattr__(self, "_non_persistent", set())
        object.__setattr__(self, "_modules", OrderedDict())
        object.__setattr__(self, "training", True)
        object.__setattr__(self, "_forward_hooks", OrderedDict())
        object.__setattr__(self, "_forward_pre_hooks", OrderedDict())

    # ----------------------------------------------------------------- registration
    def __setattr__(self, name: str, value: Any) -> None:
        if "_parameters" not in self.__dict__:
            raise AttributeError("cannot assign before Module.__init__() call")
        state.settings_changed()
        if isinstance(value, (Parameter, Module)) or name == "training" or any(
                name in table for table in (self._parameters, self._modules, self._buffers)):
            state.structure_changed()
        if isinstance(value, Parameter):
            self._forget(name)
            self._parameters[name] = value
        elif isinstance(value, Module):
            self._forget(name)
            self._modules[name] = value
        elif name in self._parameters:
            # As PyTorch: a registered name keeps its slot (None included); a value of the wrong
            # kind is an error rather than a silent unregistering of the parameter.
            if value is not None:
                raise TypeError(f"cannot assign '{type(value).__name__}' as parameter '{name}' "
                                f"(onnxgrad.nn.Parameter or None expected)")
            self._parameters[name] = None
        elif name in self._modules:
            if value is not None:
                raise TypeError(f"cannot assign '{type(value).__name__}' as child module "
                                f"'{name}' (onnxgrad.nn.Module or None expected)")
            self._modules[name] = None
        elif name in self._buffers:
            if value is not None and not isinstance(value, Tensor):
                raise TypeError(f"cannot assign '{type(value).__name__}' as buffer '{name}' "
                                f"(onnxgrad.Tensor or None expected)")
            self._buffers[name] = value
        else:
            object.__setattr__(self, name, value)

    def _forget(self, name: str) -> None:
        for table in (self._parameters, self._buffers, self._modules, self.__dict__):
            table.pop(name, None)
        self._non_persistent.discard(name)

    def __getattr__(self, name: str) -> Any:
        for table in ("_parameters", "_buffers", "_modules"):
            entries = self.__dict__.get(table)
            if entries is not None and name in entries:
                return entries[name]
        raise AttributeError(f"'{type(self).__name__}' object has no attribute '{name}'")

    def __delattr__(self, name: str) -> None:
        state.structure_changed()
        for table in (self._parameters, self._buffers, self._modules):
            if name in table:
                del table[name]
                return
        object.__delattr__(self, name)

    def register_buffer(self, name: str, tensor: Tensor | None, persistent: bool = True) -> None:
        state.structure_changed()
        if tensor is not None and not isinstance(tensor, Tensor):
            raise TypeError(f"buffer {name!r} must be a Tensor or None, got {type(tensor).__name__}")
        self._forget(name)
        self._buffers[name] = tensor
        if not persistent:
            self._non_persistent.add(name)

    def register_parameter(self, name: str, param: Parameter | None) -> None:
        state.structure_changed()
        if param is not None and not isinstance(param, Parameter):
            raise TypeError(f"parameter {name!r} must be a Parameter or None")
        self._parameters[name] = param

    def add_module(self, name: str, module: Module | None) -> None:
        if module is not None and not isinstance(module, Module):
            raise TypeError(f"{type(module).__module__}.{type(module).__qualname__} is not a "
                            f"Module subclass")
        if not isinstance(name, str):
            raise TypeError(f"module name should be a string. Got {type(name).__name__}")
        if "." in name:
            raise KeyError(f'module name can\'t contain ".", got: {name}')
        state.structure_changed()
        self._modules[name] = module

    def register_module(self, name: str, module: Module | None) -> None:
        self.add_module(name, module)

    # ----------------------------------------------------------------- hooks
    def register_forward_pre_hook(self, hook: Callable[..., Any], *, prepend: bool = False,
                                  with_kwargs: bool = False) -> RemovableHandle:
        """``hook(module, args)`` before each forward (``hook(module, args, kwargs)`` with
        ``with_kwargs``); a value it returns replaces the arguments, as in PyTorch.

        NOTE: in a compiled function hooks run while tracing, like the forward they wrap;
        registering or removing one retraces.
        """
        return self._add_hook("_forward_pre_hooks", hook, prepend, with_kwargs)

    def register_forward_hook(self, hook: Callable[..., Any], *, prepend: bool = False,
                              with_kwargs: bool = False,
                              always_call: bool = False) -> RemovableHandle:
        """``hook(module, args, output)`` after each forward (``hook(module, args, kwargs,
        output)`` with ``with_kwargs``); a value it returns replaces the output, as in PyTorch.
        ``always_call``: it runs even when the forward raises."""
        return self._add_hook("_forward_hooks", hook, prepend, with_kwargs, always_call)

    def _add_hook(self, table: str, hook: Callable[..., Any], prepend: bool, with_kwargs: bool,
                  always_call: bool = False) -> RemovableHandle:
        hooks = self.__dict__.setdefault(table, OrderedDict())
        handle = RemovableHandle(hooks)
        hooks[handle.id] = (hook, with_kwargs, always_call)
        if prepend:
            hooks.move_to_end(handle.id, last=False)
        state.structure_changed()  # compiled functions retrace with the new hooks
        return handle

    def _forward_with_hooks(self, args: tuple, kwargs: dict) -> Any:
        for hook, with_kwargs, _ in list(self.__dict__.get("_forward_pre_hooks", {}).values()):
            if with_kwargs:
                found = hook(self, args, kwargs)
                if found is not None:
                    if not (isinstance(found, tuple) and len(found) == 2):
                        raise RuntimeError("forward pre-hook must return None or a tuple of "
                                           f"(new_args, new_kwargs), but got {found}.")
                    args, kwargs = found
            else:
                found = hook(self, args)
                if found is not None:
                    args = found if isinstance(found, tuple) else (found,)
        hooks = list(self.__dict__.get("_forward_hooks", {}).values())
        try:
            result = self.forward(*args, **kwargs)
        except Exception:
            for hook, with_kwargs, always_call in hooks:
                if always_call:
                    try:
                        hook(self, args, kwargs, None) if with_kwargs else hook(self, args, None)
                    except Exception:  # noqa: BLE001, S110  (the forward's error is the one to see)
                        pass
            raise
        for hook, with_kwargs, _ in hooks:
            found = hook(self, args, kwargs, result) if with_kwargs else hook(self, args, result)
            if found is not None:
                result = found
        return result

    # ----------------------------------------------------------------- traversal
    def named_modules(self, memo: set | None = None, prefix: str = "",
                      remove_duplicate: bool = True) -> Iterator[tuple[str, Module]]:
        """PyTorch's signature and order; ``memo`` holds the modules already seen."""
        memo = set() if memo is None else memo
        stack: list[tuple[str, Module]] = [(prefix, self)]
        while stack:  # NOTE: iterative, so very deep models cannot hit the recursion limit
            path, module = stack.pop()
            if remove_duplicate:
                if module in memo:
                    continue
                memo.add(module)
            yield path, module
            children = [(f"{path}.{n}" if path else n, m)
                        for n, m in module._modules.items() if m is not None]
            stack.extend(reversed(children))

    def modules(self) -> Iterator[Module]:
        for _, m in self.named_modules():
            yield m

    def named_children(self) -> Iterator[tuple[str, Module]]:
        seen: set[int] = set()
        for name, m in self._modules.items():
            if m is not None and id(m) not in seen:
                seen.add(id(m))
                yield name, m

    def children(self) -> Iterator[Module]:
        for _, m in self.named_children():
            yield m

    def _named(self, table: str, prefix: str, recurse: bool, remove_duplicate: bool = True
               ) -> Iterator[tuple[str, Tensor]]:
        seen: set[int] = set()
        modules = (self.named_modules(prefix=prefix, remove_duplicate=remove_duplicate)
                   if recurse else [(prefix, self)])
        for path, module in modules:
            for name, t in getattr(module, table).items():
                if t is None or (remove_duplicate and id(t) in seen):
                    continue
                seen.add(id(t))
                yield (f"{path}.{name}" if path else name), t

    def named_parameters(self, prefix: str = "", recurse: bool = True,
                         remove_duplicate: bool = True) -> Iterator[tuple[str, Parameter]]:
        yield from self._named("_parameters", prefix, recurse, remove_duplicate)

    def parameters(self, recurse: bool = True) -> Iterator[Parameter]:
        for _, p in self.named_parameters(recurse=recurse):
            yield p

    def named_buffers(self, prefix: str = "", recurse: bool = True,
                      remove_duplicate: bool = True) -> Iterator[tuple[str, Tensor]]:
        yield from self._named("_buffers", prefix, recurse, remove_duplicate)

    def get_submodule(self, target: str) -> Module:
        """The submodule at dotted path ``target`` (``""`` is this module), PyTorch's errors."""
        if target == "":
            return self
        module: Module = self
        for item in target.split("."):
            if not hasattr(module, item):
                raise AttributeError(f"{type(module).__name__} has no attribute `{item}`")
            module = getattr(module, item)
            if not isinstance(module, Module):
                raise AttributeError(  # noqa: TRY004  (PyTorch's error type)
                    f"`{item}` is not an nn.Module")
        return module

    def get_parameter(self, target: str) -> Parameter:
        module_path, _, name = target.rpartition(".")
        module = self.get_submodule(module_path)
        if not hasattr(module, name):
            raise AttributeError(f"{type(module).__name__} has no attribute `{name}`")
        param = getattr(module, name)
        if not isinstance(param, Parameter):
            raise AttributeError(  # noqa: TRY004  (PyTorch's error type)
                f"`{name}` is not an nn.Parameter")
        return param

    def get_buffer(self, target: str) -> Tensor:
        module_path, _, name = target.rpartition(".")
        module = self.get_submodule(module_path)
        if not hasattr(module, name):
            raise AttributeError(f"{type(module).__name__} has no attribute `{name}`")
        if name not in module._buffers:
            raise AttributeError(f"`{name}` is not a buffer")
        return module._buffers[name]

    def buffers(self, recurse: bool = True) -> Iterator[Tensor]:
        for _, b in self.named_buffers(recurse=recurse):
            yield b

    # ----------------------------------------------------------------- state
    def state_dict(self) -> OrderedDict[str, Tensor]:
        """Parameters and persistent buffers by qualified name (detached, sharing data)."""
        return OrderedDict((k, t.detach()) for k, t in self._state_tensors().items())

    def _state_tensors(self) -> dict[str, Tensor]:
        """The state by qualified name, in ``state_dict`` order.

        NOTE: unlike ``named_modules``, a module reached by several paths is listed under each
        (``Sequential(lin, lin)`` has ``0.weight`` and ``1.weight``), as PyTorch's state_dict
        recursion does: a checkpoint of either model loads into the other.
        """
        out: dict[str, Tensor] = {}
        # Iterative preorder (DESIGN: no recursion); ``above`` guards against a module cycle.
        stack: list[tuple[str, Module, tuple[int, ...]]] = [("", self, ())]
        while stack:
            path, module, above = stack.pop()
            for table in ("_parameters", "_buffers"):
                for name, t in getattr(module, table).items():
                    if t is not None and not (table == "_buffers" and name in module._non_persistent):
                        out[f"{path}.{name}" if path else name] = t
            above = above + (id(module),)
            children = [(f"{path}.{n}" if path else n, m, above)
                        for n, m in module._modules.items() if m is not None and id(m) not in above]
            stack.extend(reversed(children))
        return out

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True):
        """Copy values (tensors or NumPy arrays) into parameters and buffers, in place."""
        own = self._state_tensors()
        missing = [k for k in own if k not in state_dict]
        unexpected = [k for k in state_dict if k not in own]
        if strict and (missing or unexpected):
            raise RuntimeError(
                f"Error(s) in loading state_dict for {type(self).__name__}: "
                f"missing keys: {missing}; unexpected keys: {unexpected}")
        errors = []
        arrays: dict[str, np.ndarray] = {}
        for key, target in own.items():
            if key not in state_dict:
                continue
            value = state_dict[key]
            array = value._v.data if isinstance(value, Tensor) else np.asarray(value)
            if array.shape != target.shape:
                errors.append(f"size mismatch for {key}: expected shape {list(target.shape)}, "
                              f"got {list(array.shape)}")
                continue
            arrays[key] = np.array(array, dtype=target.dtype, copy=True)
        if errors:
            raise RuntimeError(f"Error(s) in loading state_dict for {type(self).__name__}: "
                               + "; ".join(errors))
        for key, array in arrays.items():
            own[key]._set_leaf_data(_contig(array))
        from collections import namedtuple

        return namedtuple("IncompatibleKeys", ["missing_keys", "unexpected_keys"])(
            missing, unexpected)

    # ----------------------------------------------------------------- modes and grads
    def train(self, mode: bool = True) -> Module:
        state.structure_changed()  # compiled steps key on the modes
        for m in self.modules():
            object.__setattr__(m, "training", bool(mode))
        return self

    def eval(self) -> Module:
        return self.train(False)

    def zero_grad(self, set_to_none: bool = True) -> None:
        zero_grads(self.parameters(), set_to_none)

    def requires_grad_(self, requires_grad: bool = True) -> Module:
        for p in self.parameters():
            p.requires_grad_(requires_grad)
        return self

    def to(self, *args: Any, **kwargs: Any) -> Module:
        """``to(dtype)``, ``to(device, dtype)``, ``to(tensor)``, as PyTorch's: floating-point
        parameters and buffers are cast in place; a device is checked and moves nothing (one
        compute device per process, ``tracer/device.py``)."""
        kwargs.pop("non_blocking", None)
        device, dtype = parse_to(args, kwargs)
        if device is not None:
            check(device)
        if dtype is None:
            return self
        dtype = as_dtype(dtype)
        if dtype.kind != "f":
            raise TypeError("nn.Module.to only accepts floating point or complex dtypes, but got "
                            f"desired dtype={dtype}")
        dtype = dtype.dtype
        for t in {id(t): t for t in self._state_tensors().values()}.values():
            if t.dtype.kind == "f":
                t._set_leaf_data(t._v.data.astype(dtype))
        return self

    def double(self) -> Module:
        return self.to(np.float64)

    def half(self) -> Module:
        return self.to(np.float16)

    def cpu(self) -> Module:
        return self.to("cpu")

    def cuda(self, device: Any = None) -> Module:
        return self.to("cuda" if device is None else device)

    def float(self) -> Module:
        return self.to(np.float32)

    def apply(self, fn) -> Module:
        """``fn`` on every submodule, then on this one, in PyTorch's order: each child's whole
        subtree (post-order) before the next child. Iterative, as named_modules."""
        stack: list[tuple[Module, bool]] = [(self, False)]
        while stack:
            module, children_done = stack.pop()
            if children_done:
                fn(module)
                continue
            stack.append((module, True))
            stack.extend((child, False) for child in reversed(list(module.children())))
        return self

    # ----------------------------------------------------------------- calling
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError(f"{type(self).__name__} has no forward()")

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if _calls:
            parent, parent_path = _calls[-1]
            name = next((n for n, m in parent._modules.items() if m is self), None)
            name = name if name is not None else type(self).__name__.lower()
            path = f"{parent_path}.{name}" if parent_path else name
        else:
            path = ""
            trace = state.active_trace()
            if trace is not None:
                trace.add_module(self)
        _calls.append((self, path))
        state.push_module(path)
        try:
            return self._forward_with_hooks(args, kwargs)
        except ShapeError as exc:
            if getattr(exc, "_layer_named", False):
                raise
            label = path or type(self).__name__
            err = ShapeError(f"{label} ({self._short_repr()}): {exc}")
            err._layer_named = True
            raise err from None
        finally:
            state.pop_module()
            _calls.pop()

    # ----------------------------------------------------------------- repr
    def extra_repr(self) -> str:
        return ""

    def _short_repr(self) -> str:
        return f"{type(self).__name__}({self.extra_repr()})"

    def __repr__(self) -> str:
        # PyTorch's layout: a one-line extra_repr of a leaf stays inline; otherwise the extra
        # lines, then the children, each on a line of its own.
        extra = self.extra_repr()
        extra_lines = extra.split("\n") if extra else []
        child_lines = [f"({name}): " + repr(m).replace("\n", "\n  ")
                       for name, m in self._modules.items()]
        head = f"{type(self).__name__}("
        if len(extra_lines) == 1 and not child_lines:
            return head + extra_lines[0] + ")"
        lines = extra_lines + child_lines
        if not lines:
            return head + ")"
        return head + "\n  " + "\n  ".join(lines) + "\n)"


# --------------------------------------------------------------------------- initialisation
def _uniform(shape: tuple[int, ...], bound: float) -> np.ndarray:
    return generator().uniform(-bound, bound, size=shape).astype(get_default_dtype())


def _kaiming_uniform_a_sqrt5(shape: tuple[int, ...], fan_in: int) -> np.ndarray:
    # PyTorch's default for Linear and Conv: kaiming_uniform_(a=sqrt(5)) == U(-1/sqrt(fan_in), ..)
    return _uniform(shape, 1.0 / math.sqrt(fan_in) if fan_in else 0.0)


def _reset_weight_and_bias(weight: Tensor, bias: Tensor | None) -> None:
    """Linear's and Conv's ``reset_parameters``, as PyTorch's."""
    init.kaiming_uniform_(weight, a=math.sqrt(5))
    if bias is not None:
        fan_in, _ = init._calculate_fan_in_and_fan_out(weight)
        bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0
        init.uniform_(bias, -bound, bound)


def _pair(v: Any) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, (int, np.integer)) else tuple(int(x) for x in v)


# --------------------------------------------------------------------------- layers
class Identity(Module):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__()

    def forward(self, x: Tensor) -> Tensor:
        return x


class Linear(Module):
    def __init__(self, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = Parameter(_kaiming_uniform_a_sqrt5((out_features, in_features), in_features))
        self.bias = (Parameter(_uniform((out_features,), 1 / math.sqrt(in_features)))
                     if bias else None)

    def reset_parameters(self) -> None:
        """PyTorch's init again: kaiming_uniform_(a=sqrt(5)), bias U(+-1/sqrt(fan_in))."""
        _reset_weight_and_bias(self.weight, self.bias)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}")


class Conv2d(Module):
    def __init__(self, in_channels: int, out_channels: int, kernel_size: Any, stride: Any = 1,
                 padding: Any = 0, dilation: Any = 1, groups: int = 1, bias: bool = True) -> None:
        super().__init__()
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"in_channels ({in_channels}) and out_channels ({out_channels}) "
                             f"must be divisible by groups ({groups})")
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        self.kernel_size, self.stride = _pair(kernel_size), _pair(stride)
        # As PyTorch, a bad padding string is an error when the layer is made, not at first use.
        if isinstance(padding, str) and padding not in ("valid", "same"):
            raise ValueError(f"Invalid padding string {padding!r}, should be one of "
                             "{'valid', 'same'}")
        if padding == "same" and self.stride != (1, 1):
            raise ValueError("padding='same' is not supported for strided convolutions")
        self.padding = padding if isinstance(padding, str) else _pair(padding)
        self.dilation = _pair(dilation)
        shape = (out_channels, in_channels // groups) + self.kernel_size
        fan_in = shape[1] * shape[2] * shape[3]
        self.weight = Parameter(_kaiming_uniform_a_sqrt5(shape, fan_in))
        self.bias = Parameter(_uniform((out_channels,), 1 / math.sqrt(fan_in))) if bias else None

    def reset_parameters(self) -> None:
        _reset_weight_and_bias(self.weight, self.bias)

    def forward(self, x: Tensor) -> Tensor:
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation,
                        self.groups)

    def extra_repr(self) -> str:
        s = (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
             f"stride={self.stride}")
        if self.padding != (0, 0):  # PyTorch shows padding=valid too
            s += f", padding={self.padding}"
        if self.dilation != (1, 1):
            s += f", dilation={self.dilation}"
        if self.groups != 1:
            s += f", groups={self.groups}"
        if self.bias is None:
            s += ", bias=False"
        return s


class _BatchNorm(Module):
    """The batch norms' shared code; each subclass checks its input's rank."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.1,
                 affine: bool = True, track_running_stats: bool = True, *,
                 bias: bool = True) -> None:
        if momentum is None:
            raise ValueError(f"{type(self).__name__}(momentum=None) (a cumulative moving average) "
                             f"is not supported; pass a float momentum such as 0.1")
        super().__init__()
        self.num_features, self.eps, self.momentum = num_features, eps, momentum
        self.affine, self.track_running_stats = affine, track_running_stats
        dt = get_default_dtype()
        self.weight = Parameter(np.ones(num_features, dt)) if affine else None
        # NOTE: keyword-only ``bias`` (affine scale without shift) as in PyTorch 2.13.
        self.bias = Parameter(np.zeros(num_features, dt)) if affine and bias else None
        if track_running_stats:
            self.register_buffer("running_mean", Tensor(Val(np.zeros(num_features, dt))))
            self.register_buffer("running_var", Tensor(Val(np.ones(num_features, dt))))
            self.register_buffer("num_batches_tracked", Tensor(Val(np.zeros((), np.int64))))
        else:
            self.running_mean = self.running_var = self.num_batches_tracked = None

    def _check_input_dim(self, x: Tensor) -> None:
        raise NotImplementedError

    def reset_running_stats(self) -> None:
        if self.track_running_stats:
            init.zeros_(self.running_mean)
            init.ones_(self.running_var)
            init.zeros_(self.num_batches_tracked)

    def reset_parameters(self) -> None:
        self.reset_running_stats()
        if self.weight is not None:
            init.ones_(self.weight)
        if self.bias is not None:
            init.zeros_(self.bias)

    def forward(self, x: Tensor) -> Tensor:
        self._check_input_dim(x)
        if x.shape[1] != self.num_features:
            raise ShapeError(f"expected {self.num_features} channels, got input of shape "
                             f"{list(x.shape)}")
        use_batch = self.training or not self.track_running_stats
        if self.training and self.track_running_stats:
            with state.recording_as("bn-stats"):
                nbt = self.num_batches_tracked
                nbt._assign(nbt + 1)
        return F.batch_norm(x, self.running_mean if self.track_running_stats else None,
                            self.running_var if self.track_running_stats else None,
                            self.weight, self.bias, use_batch, self.momentum, self.eps)

    def extra_repr(self) -> str:
        return (f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, "
                f"affine={self.affine}, bias={self.bias is not None}, "
                f"track_running_stats={self.track_running_stats}")


class BatchNorm1d(_BatchNorm):
    """Over [N, C] or [N, C, L]: statistics per channel, as ``BatchNorm2d``."""

    def _check_input_dim(self, x: Tensor) -> None:
        if x.ndim not in (2, 3):
            raise ShapeError(f"expected 2D or 3D input (got {x.ndim}D input)")


class BatchNorm2d(_BatchNorm):
    def _check_input_dim(self, x: Tensor) -> None:
        if x.ndim != 4:
            raise ShapeError(f"expected 4D input (got {x.ndim}D input)")


class ReLU(Module):
    def __init__(self, inplace: bool = False) -> None:
        super().__init__()
        self.inplace = inplace

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(x)

    def extra_repr(self) -> str:
        return "inplace=True" if self.inplace else ""


class MaxPool2d(Module):
    def __init__(self, kernel_size: Any, stride: Any = None, padding: Any = 0, dilation: Any = 1,
                 ceil_mode: bool = False) -> None:
        super().__init__()
        self.kernel_size, self.stride = kernel_size, stride if stride is not None else kernel_size
        self.padding, self.dilation, self.ceil_mode = padding, dilation, ceil_mode

    def forward(self, x: Tensor) -> Tensor:
        return F.max_pool2d(x, self.kernel_size, self.stride, self.padding, self.dilation,
                            self.ceil_mode)

    def extra_repr(self) -> str:
        return (f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}, "
                f"dilation={self.dilation}, ceil_mode={self.ceil_mode}")


class AvgPool2d(Module):
    def __init__(self, kernel_size: Any, stride: Any = None, padding: Any = 0,
                 ceil_mode: bool = False, count_include_pad: bool = True) -> None:
        super().__init__()
        self.kernel_size, self.stride = kernel_size, stride if stride is not None else kernel_size
        self.padding, self.ceil_mode, self.count_include_pad = padding, ceil_mode, count_include_pad

    def forward(self, x: Tensor) -> Tensor:
        return F.avg_pool2d(x, self.kernel_size, self.stride, self.padding, self.ceil_mode,
                            self.count_include_pad)

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}"


class AdaptiveAvgPool2d(Module):
    def __init__(self, output_size: Any) -> None:
        super().__init__()
        self.output_size = output_size

    def forward(self, x: Tensor) -> Tensor:
        return F.adaptive_avg_pool2d(x, self.output_size)

    def extra_repr(self) -> str:
        return f"output_size={self.output_size}"


class Flatten(Module):
    def __init__(self, start_dim: int = 1, end_dim: int = -1) -> None:
        super().__init__()
        self.start_dim, self.end_dim = start_dim, end_dim

    def forward(self, x: Tensor) -> Tensor:
        return F.flatten(x, self.start_dim, self.end_dim)

    def extra_repr(self) -> str:
        return f"start_dim={self.start_dim}, end_dim={self.end_dim}"


class _DropoutNd(Module):
    def __init__(self, p: float = 0.5, inplace: bool = False) -> None:
        super().__init__()
        if not 0 <= p <= 1:
            raise ValueError(f"dropout probability has to be between 0 and 1, but got {p}")
        self.p, self.inplace = p, inplace  # inplace only shows in the repr, as in ReLU

    def extra_repr(self) -> str:
        return f"p={self.p}, inplace={self.inplace}"


class Dropout(_DropoutNd):
    def forward(self, x: Tensor) -> Tensor:
        return F.dropout(x, self.p, self.training)


class Dropout1d(_DropoutNd):
    """Zeroes whole channels of [N, C, L] (or [C, L]) input."""

    def forward(self, x: Tensor) -> Tensor:
        return F.dropout1d(x, self.p, self.training)


class Dropout2d(_DropoutNd):
    """Zeroes whole channels of [N, C, H, W] (or [N, C, L], as PyTorch) input."""

    def forward(self, x: Tensor) -> Tensor:
        return F.dropout2d(x, self.p, self.training)


class Sequential(Module):
    def __init__(self, *layers: Module) -> None:
        super().__init__()
        if len(layers) == 1 and isinstance(layers[0], OrderedDict):
            for name, layer in layers[0].items():
                self.add_module(name, layer)
        else:
            for i, layer in enumerate(layers):
                self.add_module(str(i), layer)

    def __getitem__(self, i: int | slice) -> Module:
        if isinstance(i, slice):  # PyTorch: a slice is a Sequential keeping the names
            return Sequential(OrderedDict(list(self._modules.items())[i]))
        return list(self._modules.values())[i]

    def __len__(self) -> int:
        return len(self._modules)

    def __iter__(self) -> Iterator[Module]:
        return iter(self._modules.values())

    def __setitem__(self, idx: int, module: Module) -> None:
        key = list(self._modules)[idx]
        self.add_module(key, module)

    def __delitem__(self, idx: int | slice) -> None:
        keys = list(self._modules)
        for key in keys[idx] if isinstance(idx, slice) else [keys[idx]]:
            del self._modules[key]
        state.structure_changed()
        # PyTorch renumbers what is left, names included: "0", "1"...
        kept = list(self._modules.values())
        self._modules.clear()
        for i, m in enumerate(kept):
            self.add_module(str(i), m)

    def append(self, module: Module) -> Sequential:
        self.add_module(str(len(self)), module)
        return self

    def extend(self, sequential: Any) -> Sequential:
        for layer in sequential:
            self.append(layer)
        return self

    def insert(self, index: int, module: Module) -> Sequential:
        n = len(self._modules)
        if not -n <= index <= n:
            raise IndexError(f"Index out of range: {index}")
        index = index + n if index < 0 else index
        layers = list(self._modules.values())
        layers.insert(index, module)
        self._modules.clear()
        for i, m in enumerate(layers):
            self.add_module(str(i), m)
        return self

    def pop(self, key: int | slice) -> Module:
        v = self[key]
        del self[key]
        return v

    def forward(self, x: Any) -> Any:
        for layer in self._modules.values():
            x = layer(x)
        return x
