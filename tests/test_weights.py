"""Checkpoints are read with weights_only=True or from safetensors; pickled code is refused."""

from __future__ import annotations

import pytest
import torch

from clipkit.errors import ClipkitError
from clipkit.models import UnsafeCheckpointError, build_model, read_state_dict
from conftest import run_clipkit


class _Payload:
    """Unpickling this runs code: it writes a marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('pwned')",))


def _malicious_checkpoint(tmp_path):
    marker = tmp_path / "pwned"
    state_dict = build_model("tiny").model.state_dict()
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": state_dict, "extra": _Payload(marker)}, path)
    # Sanity: this file really does run code when unpickled without weights_only.
    torch.load(path, weights_only=False)
    assert marker.exists()
    marker.unlink()
    return path, marker


def test_malicious_pickle_is_refused_without_running_it(tmp_path):
    path, marker = _malicious_checkpoint(tmp_path)
    with pytest.raises(UnsafeCheckpointError, match=r"refusing to load .*evil.pt.*convert it once"):
        read_state_dict(path)
    with pytest.raises(UnsafeCheckpointError):
        build_model("tiny", pretrained=path)
    assert not marker.exists()


def test_cli_refuses_malicious_pickle_in_one_line(tmp_path):
    path, marker = _malicious_checkpoint(tmp_path)
    result = run_clipkit("export", "tiny", "--pretrained", str(path), "--out", str(tmp_path / "out"))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "refusing to load" in lines[0] and "evil.pt" in lines[0]
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_plain_and_wrapped_state_dicts_load(tmp_path):
    source = build_model("tiny").model
    expected = source.state_dict()
    torch.save(expected, tmp_path / "plain.pt")
    torch.save({"state_dict": {f"_orig_mod.{k}": v for k, v in expected.items()}}, tmp_path / "compiled.pt")
    for name in ("plain.pt", "compiled.pt"):
        loaded = build_model("tiny", pretrained=tmp_path / name).model.state_dict()
        for key, value in expected.items():
            torch.testing.assert_close(loaded[key], value, rtol=0, atol=0)


def test_bad_weight_files_name_the_file(tmp_path):
    with pytest.raises(ClipkitError, match=r"weights file not found: .*missing.pt"):
        read_state_dict(tmp_path / "missing.pt")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ClipkitError, match=r"junk.safetensors is not a readable safetensors file"):
        read_state_dict(tmp_path / "junk.safetensors")
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(ClipkitError, match="does not hold a state dict"):
        read_state_dict(tmp_path / "list.pt")


def test_weights_for_another_architecture_are_refused(tmp_path):
    other = build_model(
        {
            "name": "other",
            "arch": "ViT-B-32",
            "vision_cfg": {"image_size": 64, "layers": 1},
            "text_cfg": {"layers": 1},
        }
    ).model
    torch.save(other.state_dict(), tmp_path / "other.pt")
    with pytest.raises(ClipkitError, match=r"do not fit this architecture"):
        build_model("tiny", pretrained=tmp_path / "other.pt")
