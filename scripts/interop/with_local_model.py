"""Run a clip-retrieval command (its own CLI, unchanged) with a clipkit-exported open_clip model it can load:

    python scripts/interop/with_local_model.py MODEL_DIR inference --clip_model open_clip:clipkit-local ...

clip-retrieval loads models by open_clip name and downloads their weights; this registers MODEL_DIR's
open_clip_config.json as the architecture "clipkit-local" and rewrites `open_clip:clipkit-local` to load
MODEL_DIR's weights file, so it runs offline. Its back end is bound to 127.0.0.1 (clip_back binds every
interface). Runs in the interop virtualenv (scripts/interop/make_venv.sh), never in clipkit's.
"""

import json
import sys
import tempfile
from pathlib import Path

import flask
import open_clip

NAME = "clipkit-local"


def main() -> None:
    model_dir = Path(sys.argv[1]).resolve()
    config = json.loads((model_dir / "open_clip_config.json").read_text())
    folder = Path(tempfile.mkdtemp())
    (folder / f"{NAME}.json").write_text(json.dumps(config["model_cfg"]))
    open_clip.add_model_config(folder / f"{NAME}.json")
    weights = model_dir / "open_clip_model.safetensors"
    args = [a.replace(f"open_clip:{NAME}", f"open_clip:{NAME}/{weights}") for a in sys.argv[2:]]

    run = flask.Flask.run
    flask.Flask.run = lambda self, host=None, port=None, **kw: run(self, host="127.0.0.1", port=port, **kw)
    from clip_retrieval.cli import main as clip_retrieval_main

    sys.argv = ["clip-retrieval", *args]
    clip_retrieval_main()


if __name__ == "__main__":
    main()
