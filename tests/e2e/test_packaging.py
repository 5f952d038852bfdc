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

ROOT = Path(__file__).resolve().parents[2]


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


def test_the_shipped_weights_are_one_network_with_named_presets(tmp_path):
    """One folder, presets fast (the default) and accurate (the 2^1.5 scale,
    the mirror pass, the scale prior); --preset picks one and options given
    win over it; an unknown name lists those there are; the figures the
    listing shows are the model card's."""
    import json

    from deepmask_cli import load_proposer
    from deepmask_cli.modeling.weights import shipped_names, shipped_weights
    from deepmask_cli.pipeline.loading import describe_weights

    assert shipped_names() == ["deepmask-lite0-coco"]
    fast = load_proposer(device="cpu").config
    slow = load_proposer(device="cpu", preset="accurate").config
    assert load_proposer(device="cpu", preset="fast").config == fast
    assert slow.flip and not fast.flip
    assert max(slow.scales) == 2 ** 1.5 > max(fast.scales) and slow.scale_prior < 0
    assert not load_proposer(device="cpu", preset="accurate", overrides={"flip": False}).config.flip
    with pytest.raises(ValueError, match="no such preset \\(it has: fast, accurate\\)"):
        load_proposer(device="cpu", preset="best")
    (listing,) = describe_weights()
    card = (shipped_weights() / "MODEL_CARD.md").read_text()
    assert [p["name"] for p in listing["presets"]] == ["fast", "accurate"] and listing["default"]
    for p in listing["presets"]:
        assert set(p["measured"]) == {"mask_AR@100", "box_AR@100", "seconds_per_photo"}
        assert all(f"{v:.3f}" in card for v in p["measured"].values()), p
    # a folder's presets are checked where the file is read
    bad = tmp_path / "w"
    bad.mkdir()
    cfg = json.loads((shipped_weights() / "config.json").read_text())
    cfg["presets"]["accurate"]["flip"] = "yes"
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="preset accurate: InferenceConfig.flip must be true or false"):
        describe_weights([bad])
