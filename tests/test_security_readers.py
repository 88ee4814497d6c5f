"""Every loader clipkit uses on files from a model, checkpoint or index directory is one that runs no code
from the file (SECURITY.md lists them): this scan fails when a code-running one appears in src/."""

from __future__ import annotations

import re

from conftest import REPO_ROOT

# (pattern, why it is refused); a match is allowed only on a line that says why with "# security: ".
CODE_RUNNING_LOADERS = [
    (
        r"\bpickle\.(load|loads|Unpickler)\b",
        "unpickling runs code: read DCP indexes with models.dcp_metadata",
    ),
    (r"\btorch\.load\((?![^)]*weights_only=True)", "torch.load without weights_only=True unpickles objects"),
    (r"weights_only\s*=\s*False", "weights_only=False unpickles objects"),
    (r"\byaml\.(load|unsafe_load|full_load)\(", "yaml.load builds Python objects: use yaml.safe_load"),
    (r"allow_pickle\s*=\s*True", "np.load(allow_pickle=True) unpickles objects"),
    (r"trust_remote_code\s*=\s*True", "runs Python files shipped with a transformers checkpoint"),
    (r"\bregister_for_checkpointing\b", "Accelerate reloads registered objects with weights_only=False"),
    (r"(?<![.\w])(eval|exec)\(", "evaluates text"),
]


def test_no_code_running_loader_in_the_library():
    found = []
    for path in sorted((REPO_ROOT / "src" / "clipkit").rglob("*.py")):
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            code = line.split("#", 1)[0] if "# security: " not in line else ""
            for pattern, why in CODE_RUNNING_LOADERS:
                if re.search(pattern, code) and not code.lstrip().startswith(('f"', '"', "f'", "'")):
                    found.append(f"{path.relative_to(REPO_ROOT)}:{number}: {why}: {line.strip()}")
    assert not found, "\n".join(found)


def test_the_scan_catches_each_loader():
    samples = [
        "obj = pickle.load(f)",
        "state = torch.load(path, map_location='cpu')",
        "state = torch.load(path, weights_only=False)",
        "cfg = yaml.load(text)",
        "a = np.load(p, allow_pickle=True)",
        "AutoModel.from_pretrained(p, trust_remote_code=True)",
        "accelerator.register_for_checkpointing(obj)",
        "value = eval(text)",
    ]
    for sample, (pattern, _) in zip(samples, CODE_RUNNING_LOADERS, strict=True):
        assert re.search(pattern, sample), sample
    assert not re.search(
        CODE_RUNNING_LOADERS[1][0], "torch.load(path, map_location='cpu', weights_only=True)"
    )


def test_a_transformers_checkpoint_with_remote_code_loads_without_running_it(tmp_path):
    """config.json / tokenizer_config.json may name Python files shipped beside the weights (auto_map);
    clipkit loads with transformers' own classes and never imports them."""
    import json

    from clipkit.models import build_model
    from clipkit.models.hf_export import export_transformers

    model_dir = export_transformers(build_model("tiny"), tmp_path / "hf")
    marker = tmp_path / "ran"
    (model_dir / "evil.py").write_text(
        f"open({str(marker)!r}, 'w').write('ran')\nfrom transformers import CLIPConfig as EvilConfig\n"
    )
    for name, key in (("config.json", "AutoConfig"), ("tokenizer_config.json", "AutoTokenizer")):
        config = json.loads((model_dir / name).read_text())
        config["auto_map"] = {key: "evil.EvilConfig" if key == "AutoConfig" else ["evil.EvilConfig", None]}
        (model_dir / name).write_text(json.dumps(config))
    bundle = build_model(str(model_dir))
    assert bundle.has_weights and not marker.exists()
