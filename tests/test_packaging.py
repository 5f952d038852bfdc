"""The package as a user installs it: a wheel carries the shipped weights."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
@pytest.mark.skipif(sys.platform == "win32", reason="venv layout")
def test_wheel_in_a_fresh_environment_finds_its_weights(tmp_path):
    """Build a wheel from the project's files, install it (and nothing else)
    into a new environment, and run ``deepmask propose`` from a folder that
    is not the repository: the default weights come from inside the wheel."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(ROOT / "deepmask_cli", src / "deepmask_cli", ignore=ignore)
    shutil.copytree(ROOT / "weights", src / "weights", ignore=ignore)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path / "dist"), str(src)], check=True, timeout=300)
    (wheel,) = (tmp_path / "dist").glob("deepmask-*.whl")
    shutil.rmtree(src)  # nothing of the sources is left to fall back on
    # deepmask itself only from the wheel; its dependencies (torch, ...) from
    # wherever this interpreter finds them (a venv or the system), through a
    # .pth file: its lines add folders to sys.path without running their .pth
    # files, so this environment's editable install of deepmask stays out
    env_dir = tmp_path / "env"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env_dir)], check=True, timeout=120)
    py = env_dir / "bin" / "python"
    site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True, timeout=60).stdout.strip()
    deps = [p for p in sys.path if p.endswith("-packages") and Path(p).is_dir()]
    assert deps, sys.path
    (Path(site) / "deps.pth").write_text("\n".join(deps) + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps", "--no-index", "-q",
                    str(wheel)], check=True, timeout=300)

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (120, 160, 3), dtype=np.uint8)).save(elsewhere / "photo.jpg")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "DEEPMASK_WEIGHTS")}
    where = subprocess.run([str(py), "-c", "from deepmask_cli.pipeline.loading import default_weights; print(default_weights())"],
                           cwd=elsewhere, env=env, capture_output=True, text=True, timeout=120)
    assert where.returncode == 0, where.stderr
    assert Path(where.stdout.strip()).is_relative_to(env_dir), where.stdout
    r = subprocess.run([str(env_dir / "bin" / "deepmask"), "propose", "photo.jpg", "-o", "p.json", "--device", "cpu",
                        "--scales", "-1,0,1", "-q"], cwd=elsewhere, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    records = json.loads((elsewhere / "p.json").read_text())
    assert records and all(rec["file_name"] == "photo.jpg" for rec in records)


def test_weights_by_shipped_name(tmp_path, monkeypatch):
    from deepmask_cli.modeling.weights import shipped_weights, weights_folder

    assert weights_folder("deepmask-lite0-coco") == shipped_weights()
    assert weights_folder("no-such-weights") == Path("no-such-weights")
    monkeypatch.chdir(tmp_path)  # a folder of that name in the working directory wins
    (tmp_path / "deepmask-lite0-coco").mkdir()
    assert weights_folder("deepmask-lite0-coco") == Path("deepmask-lite0-coco")


def test_accurate_weights_are_the_default_network_with_their_own_settings():
    """deepmask-lite0-coco-accurate (its model card): the default's tensors and
    int8 network, bit for bit, with the slower settings tuned for recall
    (the 2^1.5 scale, the mirror pass, the scale prior) in its config.json."""
    from safetensors.torch import load_file

    from deepmask_cli.modeling.weights import load_weights, shipped_weights, weights_folder

    default, accurate = shipped_weights(), weights_folder("deepmask-lite0-coco-accurate")
    assert accurate == default.parent / "deepmask-lite0-coco-accurate" and accurate.is_dir()
    a, b = load_file(str(default / "model.safetensors")), load_file(str(accurate / "model.safetensors"))
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)
    assert (default / "trunk-int8.onnx").read_bytes() == (accurate / "trunk-int8.onnx").read_bytes()
    _, fast, cfg_fast = load_weights(default)
    _, slow, cfg_slow = load_weights(accurate)
    assert cfg_fast["model"] == cfg_slow["model"]
    assert slow.flip and not fast.flip
    assert max(slow.scales) == 2 ** 1.5 > max(fast.scales) and slow.scale_prior < 0
