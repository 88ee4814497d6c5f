"""A sharded checkpoint's index (`sharded/.metadata`, a pickle written by torch.distributed.checkpoint) read
without unpickling it.

`pickle` lets the file choose which Python callables run and with what arguments; even an allow-list of
classes runs their constructors (`__init__`, `__post_init__`, `__setstate__`, `__new__`) on attacker-chosen
state. This reader instead decodes the opcodes (`pickletools.genops`, which only parses) and interprets a
small subset itself: plain values and containers, and a fixed table of exact (module, name) pairs, each
mapped to a function of clipkit's that builds the value from checked data. Nothing named by the file is
imported, looked up by a dotted path, or called; anything outside the table or the opcode subset is refused
with the opcode's position and name.
"""

from __future__ import annotations

import collections
import dataclasses
import pathlib
import pickletools
from collections.abc import Callable
from typing import Any

import torch
from torch.distributed.checkpoint import metadata as dcp_metadata
from torch.distributed.checkpoint.filesystem import _StorageInfo

MAX_METADATA_BYTES = 512 * 1024 * 1024  # a ViT-g's index with its optimizer state is a few MB


class MetadataFormatError(ValueError):
    """The file is not a DCP index this reader accepts (names the opcode, global or field)."""


class _Global:
    """A name the file referred to, resolved through the table: what REDUCE / NEWOBJ may do with it."""

    def __init__(self, label: str, *, reduce: Callable[..., Any] | None = None, new: type | None = None):
        self.label, self.reduce, self.new = label, reduce, new


def _size(values) -> torch.Size:
    if not isinstance(values, tuple | list) or not all(_is_count(v) for v in values):
        raise MetadataFormatError(f"torch.Size of {type(values).__name__} {values!r:.80}: expected counts")
    return torch.Size(values)


def _is_count(value) -> bool:
    return type(value) is int and value >= 0


_LAYOUTS = {str(v): v for v in vars(torch).values() if isinstance(v, torch.layout)}
_DTYPES = {name: v for name, v in vars(torch).items() if isinstance(v, torch.dtype)}
_MEM_FORMATS = {e.value: e for e in dcp_metadata._MEM_FORMAT_ENCODING}


def _layout(name) -> torch.layout:
    if not isinstance(name, str) or name not in _LAYOUTS:
        raise MetadataFormatError(f"unknown tensor layout {name!r:.80}")
    return _LAYOUTS[name]


def _mem_format(value) -> dcp_metadata._MEM_FORMAT_ENCODING:
    if type(value) is not int or value not in _MEM_FORMATS:
        raise MetadataFormatError(f"unknown memory format encoding {value!r:.80}")
    return _MEM_FORMATS[value]


def _path(*parts) -> pathlib.PurePosixPath:
    # The writer records the directory it wrote to (StorageMeta.checkpoint_id); only ever read as text.
    if not all(isinstance(p, str) for p in parts):
        raise MetadataFormatError("a path made of non-strings")
    return pathlib.PurePosixPath(*parts)


def _ordered_dict(*args) -> collections.OrderedDict:
    if args:  # OrderedDict pickles as OrderedDict() followed by SETITEMS
        raise MetadataFormatError("OrderedDict with constructor arguments")
    return collections.OrderedDict()


# The DCP dataclasses an index holds: created empty (no __init__ / __post_init__), fields set by BUILD.
_DATACLASSES = {
    cls.__name__: cls
    for cls in (
        dcp_metadata.Metadata,
        dcp_metadata.TensorStorageMetadata,
        dcp_metadata.TensorProperties,
        dcp_metadata.ChunkStorageMetadata,
        dcp_metadata.BytesStorageMetadata,
        dcp_metadata.MetadataIndex,
        dcp_metadata.StorageMeta,
    )
}

# Exact (module, name) pairs: nothing else may be named, and a name is never looked up in the module.
_GLOBALS: dict[tuple[str, str], Any] = {
    **{("torch.distributed.checkpoint.metadata", n): _Global(n, new=c) for n, c in _DATACLASSES.items()},
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"): _Global("_StorageInfo", new=_StorageInfo),
    ("torch.distributed.checkpoint.metadata", "_MEM_FORMAT_ENCODING"): _Global(
        "_MEM_FORMAT_ENCODING", reduce=_mem_format
    ),
    ("torch", "Size"): _Global("torch.Size", reduce=_size),
    ("torch.serialization", "_get_layout"): _Global("_get_layout", reduce=_layout),
    **{("pathlib", n): _Global(n, reduce=_path) for n in ("PosixPath", "PurePosixPath")},
    ("collections", "OrderedDict"): _Global("OrderedDict", reduce=_ordered_dict),
    **{("torch", name): dtype for name, dtype in _DTYPES.items()},  # values, not callables
}

_FIELDS = {cls: {f.name for f in dataclasses.fields(cls)} for cls in (*_DATACLASSES.values(), _StorageInfo)}


def _build(instance, state) -> None:
    """BUILD: set an instance's declared fields from a dict (TensorProperties: from its 5/6-tuple)."""
    cls = type(instance)
    if cls not in _FIELDS:
        raise MetadataFormatError(f"BUILD on a {cls.__name__}")
    if cls is dcp_metadata.TensorProperties and isinstance(state, tuple):
        state = _tensor_properties(state)
    if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
        raise MetadataFormatError(f"BUILD of {cls.__name__} with a {type(state).__name__}")
    unknown = set(state) - _FIELDS[cls]
    if unknown:
        raise MetadataFormatError(f"{cls.__name__} has no field {sorted(unknown)[0]!r:.80}")
    instance.__dict__.update(state)  # as pickle does: frozen dataclasses too, no setattr hooks


def _tensor_properties(state: tuple) -> dict[str, Any]:
    # TensorProperties.__getstate__: (dtype, layout, requires_grad, memory format encoding, pin_memory[, strides])
    if len(state) not in (5, 6):
        raise MetadataFormatError(f"TensorProperties state of length {len(state)}")
    dtype, layout, requires_grad, encoding, pin_memory, *rest = state
    strides = rest[0] if rest else None
    if not (
        isinstance(dtype, torch.dtype)
        and isinstance(layout, torch.layout)
        and isinstance(encoding, dcp_metadata._MEM_FORMAT_ENCODING)
        and type(requires_grad) is bool
        and type(pin_memory) is bool
        and (strides is None or (isinstance(strides, tuple) and all(type(s) is int for s in strides)))
    ):
        raise MetadataFormatError(f"TensorProperties state {state!r:.120}")
    memory_format = {
        dcp_metadata._MEM_FORMAT_ENCODING.TORCH_CONTIGUOUS_FORMAT: torch.contiguous_format,
        dcp_metadata._MEM_FORMAT_ENCODING.TORCH_CHANNELS_LAST: torch.channels_last,
        dcp_metadata._MEM_FORMAT_ENCODING.TORCH_PRESERVE_FORMAT: torch.preserve_format,
    }[encoding]
    return {
        "dtype": dtype,
        "layout": layout,
        "requires_grad": requires_grad,
        "memory_format": memory_format,
        "pin_memory": pin_memory,
        "strides": strides,
    }


_VALUE_OPS = {
    "NONE", "INT", "BININT", "BININT1", "BININT2", "LONG", "LONG1", "LONG4",
    "FLOAT", "BINFLOAT", "UNICODE", "SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8",
    "SHORT_BINBYTES", "BINBYTES", "BINBYTES8",
}  # fmt: skip
_IGNORED_OPS = {"PROTO", "FRAME"}


def loads(data: bytes) -> Any:
    """The object a DCP index pickle describes, built by clipkit's table; MetadataFormatError otherwise."""
    stack: list[Any] = []
    marks: list[list[Any]] = []
    memo: dict[int, Any] = {}

    def pop_mark() -> list[Any]:
        nonlocal stack
        if not marks:
            raise MetadataFormatError("a MARK-using opcode without MARK")
        items, stack = stack, marks.pop()
        return items

    def pop() -> Any:
        if not stack:
            raise MetadataFormatError("stack underflow")
        return stack.pop()

    for opcode, arg, pos in pickletools.genops(data):
        name = opcode.name
        where = f"opcode {name} at byte {pos}"
        if name in _IGNORED_OPS:
            continue
        if name in _VALUE_OPS:
            stack.append(arg)  # genops decoded it; None for NONE
        elif name in ("NEWTRUE", "NEWFALSE"):
            stack.append(name == "NEWTRUE")
        elif name == "STOP":
            if len(stack) != 1 or marks:
                raise MetadataFormatError(f"{where}: the pickle does not end with one object")
            return stack[0]
        elif name == "MARK":
            marks.append(stack)
            stack = []
        elif name == "POP":
            pop()
        elif name == "POP_MARK":
            pop_mark()
        elif name == "DUP":
            stack.append(stack[-1] if stack else pop())
        elif name in ("MEMOIZE", "PUT", "BINPUT", "LONG_BINPUT"):
            if not stack:
                raise MetadataFormatError(f"{where}: nothing to memoize")
            memo[len(memo) if name == "MEMOIZE" else int(arg)] = stack[-1]
        elif name in ("GET", "BINGET", "LONG_BINGET"):
            if int(arg) not in memo:
                raise MetadataFormatError(f"{where}: memo {arg} was never set")
            stack.append(memo[int(arg)])
        elif name in ("GLOBAL", "STACK_GLOBAL"):
            if name == "GLOBAL":
                module, _, qualname = arg.partition(" ")
            else:
                qualname, module = pop(), pop()
            key = (module, qualname)
            if not (isinstance(module, str) and isinstance(qualname, str)) or key not in _GLOBALS:
                raise MetadataFormatError(
                    f"{where} names {module!s:.80}.{qualname!s:.80}, which is not allowed"
                )
            stack.append(_GLOBALS[key])
        elif name == "EMPTY_TUPLE":
            stack.append(())
        elif name in ("TUPLE1", "TUPLE2", "TUPLE3"):
            n = int(name[-1])
            if len(stack) < n:
                raise MetadataFormatError(f"{where}: stack underflow")
            items = tuple(stack[-n:])
            del stack[-n:]
            stack.append(items)
        elif name == "TUPLE":
            items = tuple(pop_mark())  # first: pop_mark rebinds `stack`
            stack.append(items)
        elif name == "EMPTY_LIST":
            stack.append([])
        elif name == "LIST":
            items = pop_mark()
            stack.append(items)
        elif name in ("APPEND", "APPENDS"):
            items = [pop()] if name == "APPEND" else pop_mark()
            target = stack[-1] if stack else None
            if type(target) is not list:
                raise MetadataFormatError(f"{where} on a {type(target).__name__}")
            target.extend(items)
        elif name == "EMPTY_DICT":
            stack.append({})
        elif name in ("DICT", "SETITEM", "SETITEMS"):
            if name == "SETITEM":
                value = pop()
                items = [pop(), value]
            else:
                items = pop_mark()
            target = {} if name == "DICT" else (stack[-1] if stack else None)
            if not isinstance(target, dict) or len(items) % 2:
                raise MetadataFormatError(f"{where} on a {type(target).__name__}")
            try:
                for i in range(0, len(items), 2):
                    target[items[i]] = items[i + 1]
            except TypeError as e:  # an unhashable key
                raise MetadataFormatError(f"{where}: {e}") from None
            if name == "DICT":
                stack.append(target)
        elif name in ("EMPTY_SET", "FROZENSET", "ADDITEMS"):
            items = [] if name == "EMPTY_SET" else pop_mark()
            try:
                if name == "ADDITEMS":
                    target = stack[-1] if stack else None
                    if type(target) is not set:
                        raise MetadataFormatError(f"{where} on a {type(target).__name__}")
                    target.update(items)
                else:
                    collection = set(items) if name == "EMPTY_SET" else frozenset(items)
                    stack.append(collection)
            except TypeError as e:
                raise MetadataFormatError(f"{where}: {e}") from None
        elif name == "REDUCE":
            args, func = pop(), pop()
            if not isinstance(func, _Global) or func.reduce is None or not isinstance(args, tuple):
                raise MetadataFormatError(f"{where} calls {_label(func)}, which is not allowed")
            stack.append(func.reduce(*args))
        elif name == "NEWOBJ":
            args, cls = pop(), pop()
            if not isinstance(cls, _Global) or cls.new is None or args != ():
                raise MetadataFormatError(f"{where} creates {_label(cls)}, which is not allowed")
            stack.append(object.__new__(cls.new))  # no __new__ / __init__ of the class runs
        elif name == "BUILD":
            state = pop()
            _build(stack[-1] if stack else None, state)
        else:  # INST, OBJ, NEWOBJ_EX, EXT*, PERSID, BINPERSID, buffers, old string opcodes
            raise MetadataFormatError(f"{where} is not allowed in a checkpoint index")
    raise MetadataFormatError("the pickle has no STOP")


def _label(value) -> str:
    return value.label if isinstance(value, _Global) else f"a {type(value).__name__}"
