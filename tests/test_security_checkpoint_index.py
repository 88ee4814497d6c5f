"""A sharded checkpoint's index (`sharded/.metadata`, a pickle) is read without running anything it names.

The hostile pickles are written opcode by opcode (pickletools' names), each trying to create a marker file;
every one must be refused with a one-line ClipkitError and leave no marker, through every way clipkit reads
a model directory: `read_sharded_model`, `build_model`, `clipkit export / zeroshot / classify --model`, the
model an index names (what `clipkit serve --index` loads) and an FSDP resume.
"""

from __future__ import annotations

import dataclasses
import io
import json
import pickle
import struct
import sys
import types
import warnings
from pathlib import Path

import pytest
import torch
from PIL import Image

from clipkit.errors import ClipkitError
from clipkit.models.dcp_metadata import MetadataFormatError, loads
from clipkit.models.sharded import SHARDED_STATE_DIR, read_sharded_model
from conftest import run_clipkit

GADGET_MODULE = "torch.distributed.checkpoint._clipkit_test_gadget"  # where the old allow-list looked


# -- opcodes --------------------------------------------------------------------------------------------
def text(s: str) -> bytes:  # SHORT_BINUNICODE
    data = s.encode()
    return b"\x8c" + bytes([len(data)]) + data


PROTO, STOP, MARK, REDUCE, BUILD, NEWOBJ, TUPLE1 = b"\x80\x04", b".", b"(", b"R", b"b", b"\x81", b"\x85"
EMPTY_TUPLE, EMPTY_DICT, SETITEM, INST, OBJ, NEWOBJ_EX = b")", b"}", b"s", b"i", b"o", b"\x92"


def stack_global(module: str, name: str) -> bytes:
    return text(module) + text(name) + b"\x93"


def global_(module: str, name: str) -> bytes:  # GLOBAL, the text form protocols 0-3 use
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def python_touching(marker: Path) -> str:
    return f"open({str(marker)!r}, 'w').write('ran')"


def pickled(*ops: bytes) -> bytes:
    return b"".join((PROTO, *ops, STOP))


def hostile_pickles(marker: Path) -> dict[str, bytes]:
    shell, code = text(f"touch {marker}"), text(python_touching(marker))
    dcp_module = "torch.distributed.checkpoint.metadata"
    # fmt: off
    return {
        "GLOBAL os.system + REDUCE": pickled(global_("os", "system"), shell, TUPLE1, REDUCE),
        "STACK_GLOBAL builtins.exec + REDUCE": pickled(stack_global("builtins", "exec"), code, TUPLE1, REDUCE),
        "dotted name through an allowed module": pickled(stack_global(dcp_module, "os.system"), shell, TUPLE1, REDUCE),
        "dotted name to a dataclass": pickled(
            stack_global(dcp_module, "torch.distributed.checkpoint._clipkit_test_gadget.Gadget"), code, TUPLE1, REDUCE
        ),
        "dataclass whose __post_init__ runs code (REDUCE)": pickled(
            stack_global(GADGET_MODULE, "Gadget"), code, TUPLE1, REDUCE
        ),
        "dataclass whose __setstate__ runs code (NEWOBJ + BUILD)": pickled(
            stack_global(GADGET_MODULE, "Gadget"), EMPTY_TUPLE, NEWOBJ, EMPTY_DICT, text("command"), code, SETITEM, BUILD
        ),
        "INST os.system": pickled(MARK, shell, INST, b"os\nsystem\n"),
        "OBJ os.system": pickled(MARK, global_("os", "system"), shell, OBJ),
        "NEWOBJ_EX": pickled(stack_global(GADGET_MODULE, "Gadget"), EMPTY_TUPLE, EMPTY_DICT, NEWOBJ_EX),
        "EXT1 (copyreg's extension registry)": pickled(b"\x82\xf0", shell, TUPLE1, REDUCE),
        "BINPERSID": pickled(shell, b"Q"),
        "REDUCE on an allowed dataclass (its __init__)": pickled(
            stack_global(dcp_module, "Metadata"), EMPTY_DICT, TUPLE1, REDUCE
        ),
        "REDUCE on an allowed value (torch.float32)": pickled(stack_global("torch", "float32"), EMPTY_TUPLE, REDUCE),
        "BUILD onto an OrderedDict": pickled(
            stack_global("collections", "OrderedDict"), EMPTY_TUPLE, REDUCE, EMPTY_DICT, text("__class__"), code,
            SETITEM, BUILD,
        ),
        "BUILD of a field the dataclass lacks": pickled(
            stack_global(dcp_module, "StorageMeta"), EMPTY_TUPLE, NEWOBJ, EMPTY_DICT, text("__reduce__"), code,
            SETITEM, BUILD,
        ),
        "a memo slot never set": pickled(b"h\x07"),
        "truncated": PROTO + stack_global("torch", "Size"),
        "not a pickle": b"\x00hello" * 10,
        "a plain dict instead of Metadata": pickled(EMPTY_DICT),
    }
    # fmt: on


class GadgetModule(types.ModuleType):
    """Stands for a module in torch's checkpoint package holding a dataclass that runs code when built."""


@pytest.fixture
def gadget_module(monkeypatch, tmp_path):
    module = GadgetModule(GADGET_MODULE)

    @dataclasses.dataclass
    class Gadget:
        command: str = ""

        def __post_init__(self):
            exec(self.command)

        def __setstate__(self, state):
            exec(state["command"])

    Gadget.__module__, Gadget.__qualname__ = GADGET_MODULE, "Gadget"
    module.Gadget = Gadget
    monkeypatch.setitem(sys.modules, GADGET_MODULE, module)
    monkeypatch.setattr(torch.distributed.checkpoint, "_clipkit_test_gadget", module, raising=False)
    return module


def test_the_gadget_runs_code_under_plain_pickle(gadget_module, tmp_path):
    """The fuzz set is live: unrestricted unpickling of its gadgets does run code."""
    marker = tmp_path / "ran"
    for name in ("dataclass whose __post_init__ runs code (REDUCE)", "STACK_GLOBAL builtins.exec + REDUCE"):
        pickle.loads(hostile_pickles(marker)[name])
        assert marker.exists(), name
        marker.unlink()


@pytest.mark.parametrize("name", list(hostile_pickles(Path("m"))))
def test_hostile_index_is_refused_in_one_line_without_running(name, gadget_module, tmp_path):
    marker = tmp_path / "ran"
    directory = tmp_path / "sharded"
    directory.mkdir()
    (directory / ".metadata").write_bytes(hostile_pickles(marker)[name])
    with pytest.raises(ClipkitError) as refused:
        read_sharded_model(directory)
    message = str(refused.value)
    assert "\n" not in message and str(directory / ".metadata") in message
    assert not marker.exists()


# -- indexes that unpickle safely but point DCP somewhere dangerous ---------------------------------------
def save_index(directory: Path, state: dict) -> bytes:
    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.save(state, checkpoint_id=str(directory), no_dist=True)
    return (directory / ".metadata").read_bytes()


def test_a_real_index_reads_exactly_as_pickle_reads_it(tmp_path):
    state = {
        "model.w": torch.randn(3, 4),
        "model.b": torch.zeros(4, dtype=torch.bfloat16),
        "ema.w": torch.ones(2),
    }
    data = save_index(tmp_path, state)
    ours, reference = loads(data), pickle.loads(data)
    ours.storage_meta.checkpoint_id = reference.storage_meta.checkpoint_id = (
        None  # PurePosixPath vs PosixPath
    )
    assert ours == reference
    read = read_sharded_model(tmp_path)
    assert (
        read.keys() == {"w", "b"}
        and torch.equal(read["w"], state["model.w"])
        and read["b"].dtype == torch.bfloat16
    )


def test_a_non_tensor_entry_is_refused(tmp_path):
    """DCP loads a non-tensor entry with torch.load(weights_only=False): clipkit's indexes hold tensors only."""
    save_index(tmp_path, {"model.w": torch.ones(2), "optimizer.step": 3})
    with pytest.raises(ClipkitError, match="'optimizer.step' is a BytesStorageMetadata"):
        read_sharded_model(tmp_path)


def test_storage_outside_the_checkpoint_is_refused(tmp_path):
    data = save_index(tmp_path, {"model.w": torch.ones(2)})
    name = next(p.name for p in tmp_path.glob("*.distcp")).encode()
    evil = b"../../../../etc/passwd"[: len(name)].ljust(len(name), b"/")  # same length: the frame stays valid
    (tmp_path / ".metadata").write_bytes(data.replace(name, evil))
    with pytest.raises(ClipkitError, match="is not a file name in the checkpoint"):
        read_sharded_model(tmp_path)


def test_a_size_beyond_the_stored_bytes_is_refused_before_allocating(tmp_path):
    data = save_index(tmp_path, {"model.w": torch.ones(7)})
    huge = data.replace(
        b"K\x07\x85", b"J" + struct.pack("<i", 2**31 - 1) + b"\x85", 1
    )  # torch.Size((7,)) -> 2**31-1
    assert huge != data
    (tmp_path / ".metadata").write_bytes(huge)
    with pytest.raises(ClipkitError, match="describes 8589934588 bytes of tensors"):
        read_sharded_model(tmp_path)


def test_reader_refuses_opcodes_by_name():
    with pytest.raises(MetadataFormatError, match="opcode INST at byte 3 is not allowed"):
        loads(PROTO + MARK + INST + b"os\nsystem\n" + STOP)


# -- every entry point ---------------------------------------------------------------------------------
GADGET = "dotted name through an allowed module"


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory) -> Path:
    from clipkit.models import build_model, export_model

    out = export_model(build_model("tiny"), tmp_path_factory.mktemp("tiny") / "model")
    return out / "open_clip_config.json"


@pytest.fixture
def hostile_checkpoint(tiny_config, tmp_path) -> tuple[Path, Path]:
    """A checkpoint directory (open_clip_config.json + sharded/) whose index runs `touch MARKER`."""
    marker = tmp_path / "ran"
    checkpoint = tmp_path / "step_00000001"
    (checkpoint / SHARDED_STATE_DIR).mkdir(parents=True)
    (checkpoint / "open_clip_config.json").write_bytes(tiny_config.read_bytes())
    (checkpoint / "trainer_state.json").write_text(json.dumps({"step": 1, "sharded": True}))
    (checkpoint / SHARDED_STATE_DIR / ".metadata").write_bytes(hostile_pickles(marker)[GADGET])
    return checkpoint, marker


def assert_refused(result, checkpoint: Path, marker: Path) -> None:
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert (
        f"{checkpoint / SHARDED_STATE_DIR / '.metadata'} is not a clipkit sharded-checkpoint index"
        in result.stderr
    )
    assert not marker.exists()


def test_build_model_refuses(hostile_checkpoint):
    from clipkit.models import build_model

    checkpoint, marker = hostile_checkpoint
    with pytest.raises(ClipkitError, match="is not a clipkit sharded-checkpoint index"):
        build_model(str(checkpoint))
    assert not marker.exists()


@pytest.mark.slow  # three clipkit processes
def test_cli_commands_refuse(hostile_checkpoint, tmp_path):
    checkpoint, marker = hostile_checkpoint
    dataset = tmp_path / "dataset"  # a folder of class sub-folders
    for label in ("cat", "dog"):
        (dataset / label).mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(dataset / label / "a.png")
    image = dataset / "cat" / "a.png"
    commands = {
        "export": ("export", str(checkpoint), "--out", str(tmp_path / "out")),
        "classify": (
            "classify",
            str(image),
            "--model",
            str(checkpoint),
            "--labels",
            "a,b",
            "--device",
            "cpu",
        ),
        "zeroshot": ("zeroshot", "--model", str(checkpoint), "--dataset", str(dataset), "--device", "cpu"),
    }
    for name, args in commands.items():
        result = run_clipkit(*args, timeout=300)
        assert_refused(result, checkpoint, marker)
        assert not (tmp_path / "out").exists(), name


def test_the_model_an_index_names_is_refused(hostile_checkpoint, tmp_path):
    """`clipkit serve --index` (and `clipkit index` on built embeddings) load the model the manifest names."""
    from clipkit.retrieval.builder import load_index_model

    checkpoint, marker = hostile_checkpoint
    manifest = {"model": {"source": str(checkpoint), "pretrained": None, "fingerprint": "0" * 64}}
    with pytest.raises(ClipkitError, match="is not a clipkit sharded-checkpoint index"):
        load_index_model(manifest, tmp_path, model=None, pretrained=None, device="cpu", precision="fp32")
    assert not marker.exists()


def test_fsdp_resume_refuses_before_restoring_anything(hostile_checkpoint):
    from accelerate import Accelerator

    from clipkit.train.checkpoint import load_checkpoint

    checkpoint, marker = hostile_checkpoint
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    with pytest.raises(ClipkitError, match="is not a clipkit sharded-checkpoint index"):
        load_checkpoint(Accelerator(cpu=True), checkpoint, sharded=(model, optimizer, {}))
    assert not marker.exists()


def test_gadget_bytes_are_what_pickletools_reads():
    """The hand-written pickles are well-formed (so a refusal is the reader's, not a parse accident)."""
    import pickletools

    for name, data in hostile_pickles(Path("/nonexistent/m")).items():
        if name in (
            "truncated",
            "not a pickle",
            "a memo slot never set",
            "EXT1 (copyreg's extension registry)",
        ):
            continue
        pickletools.dis(data, out=io.StringIO())
