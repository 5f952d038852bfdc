"""The README is a user's manual that states the code's own defaults.

Its option summary of ``deepmask propose`` (the table rows whose first cell is
a backticked ``--option``) must give, for every option, the default the code
has: the shipped weights' resolved ``InferenceConfig`` (neutral defaults with
the weights' tuned values on top) for the options that defer to it, the
click option's own default otherwise, and what ``pipeline_defaults`` picks on
a CPU and on a GPU for ``--batch-size`` and ``--workers``. Changing a default
in ``deepmask_cli/config.py`` or ``cli.py`` without the README fails here.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from deepmask_cli.cli.propose import propose as propose_cmd
from deepmask_cli.core.config import InferenceConfig
from deepmask_cli.modeling.weights import load_weights, weights_folder
from deepmask_cli.pipeline import propose as propose_mod
from deepmask_cli.pipeline.loading import default_settings, default_weights

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
MAX_BYTES = 12 * 1024

#: The two set-up commands CI runs verbatim (.ci/run).
CI_COMMANDS = (
    "pip install -e . && deepmask propose samples/ -o props.json",
    'pip install -e ".[test]" && python -m pytest',
)

#: Options of ``deepmask propose`` the summary may leave out.
NOT_SUMMARISED = {"--out", "--quiet", "--help"}

_ROW = re.compile(r"^\|\s*`(--[^`]+)`\s*\|([^|]*)\|")
_NUMBER = r"[-+]?\d+(?:\.\d+)?"


def summary_rows() -> dict[str, str]:
    """``{first cell without backticks: default cell}`` of the option table."""
    rows: dict[str, str] = {}
    for line in README.read_text(encoding="utf-8").splitlines():
        m = _ROW.match(line)
        if m:
            assert m.group(1) not in rows, f"README states {m.group(1)} twice"
            rows[m.group(1)] = m.group(2).strip()
    return rows


ROWS = summary_rows()


def click_option(spelling: str):
    """The click Option a README first cell names: ``--x`` or ``--x/--no-x``."""
    main, _, secondary = spelling.partition("/")
    for p in propose_cmd.params:
        if main in getattr(p, "opts", ()):
            if secondary or p.secondary_opts:
                assert [secondary] == p.secondary_opts, (
                    f"README writes {spelling!r}; the option is {'/'.join(p.opts[-1:] + p.secondary_opts)}")
            return p
    raise AssertionError(f"README's option table names {spelling}, which deepmask propose does not have")


def _pipeline(device_type: str, cpu_count: int, monkeypatch) -> tuple[int, int]:
    monkeypatch.setattr(propose_mod.os, "cpu_count", lambda: cpu_count)
    return propose_mod.pipeline_defaults(SimpleNamespace(device=torch.device(device_type)))


def _inference_value(name: str, cfg: InferenceConfig):
    if name == "scales":
        return (cfg.scale_min, cfg.scale_max, cfg.scale_step)
    return getattr(cfg, name)


INFERENCE_FIELDS = {f.name for f in dataclasses.fields(InferenceConfig)} | {"scales"}
SHIPPED_INFERENCE = load_weights(default_weights())[1]


def _resolved_defaults() -> dict:
    """What each option of ``deepmask propose`` holds when not given, as the
    command itself sees it (click's own parse, whatever its version's
    representation of an unset default)."""
    ctx = propose_cmd.make_context("propose", ["photo.jpg", "-o", "out.json"], resilient_parsing=True)
    return dict(ctx.params)


DEFAULTS = _resolved_defaults()


def _strip(cell: str) -> str:
    return cell.replace("`", "").strip()


def check_cell(spelling: str, cell: str, monkeypatch) -> None:
    p = click_option(spelling)
    text = _strip(cell)
    if p.name in ("batch_size", "workers"):
        col = 0 if p.name == "batch_size" else 1
        m = re.fullmatch(r"(\d+) on a CPU, (up to )?(\d+) on a GPU", text)
        assert m, f"{spelling}: default {cell!r} is not 'N on a CPU, [up to ]M on a GPU'"
        assert DEFAULTS[p.name] is None, f"{spelling}: click default {DEFAULTS[p.name]!r}, but the README says it depends on the device"
        assert int(m.group(1)) == _pipeline("cpu", 64, monkeypatch)[col]
        gpu_many = _pipeline("cuda", 64, monkeypatch)[col]
        assert int(m.group(3)) == gpu_many, f"{spelling}: README says {m.group(3)} on a GPU, the code {gpu_many}"
        if m.group(2):  # "up to": fewer on a machine with few cores
            assert _pipeline("cuda", 2, monkeypatch)[col] <= gpu_many
        else:
            assert _pipeline("cuda", 2, monkeypatch)[col] == gpu_many
        return
    if p.name == "weights":  # a shipped folder's name, as --weights takes it
        monkeypatch.delenv("DEEPMASK_WEIGHTS", raising=False)
        monkeypatch.chdir(ROOT / "tests")  # no folder of that name here
        assert DEFAULTS[p.name] is None
        shipped = default_weights().resolve()
        named = weights_folder(text).resolve()
        assert named == shipped, f"{spelling}: README says {text} ({named}), the code {shipped}"
        return
    if p.name == "preset":  # the default weights' first preset
        assert DEFAULTS[p.name] is None
        presets = default_settings()[1]
        assert text == presets[0], f"{spelling}: README says {text}, the weights {presets}"
        return
    if p.name in INFERENCE_FIELDS:
        # the option defers to the config and the weights' tuned values
        assert DEFAULTS[p.name] is None, f"{spelling}: the CLI restates a default ({DEFAULTS[p.name]!r}) instead of InferenceConfig's"
        expected = _inference_value(p.name, SHIPPED_INFERENCE)
    else:
        expected = DEFAULTS[p.name]
    if isinstance(expected, bool):
        if p.secondary_opts:
            want = p.opts[-1] if expected else p.secondary_opts[0]
        else:
            want = "on" if expected else "off"
        assert text == want, f"{spelling}: README says {cell!r}, the code's default is {want!r}"
    elif expected is None:
        assert text == "none", f"{spelling}: README says {cell!r}, the code has no default (none)"
    elif isinstance(expected, tuple):
        got = tuple(float(v) for v in text.split(","))
        assert got == tuple(float(v) for v in expected), f"{spelling}: README says {cell!r}, the code {expected}"
    elif isinstance(expected, (int, float)):
        assert re.fullmatch(_NUMBER, text), f"{spelling}: default {cell!r} is not a number"
        assert float(text) == expected, f"{spelling}: README says {text}, the code {expected!r}"
        if isinstance(expected, int):
            assert re.fullmatch(r"[-+]?\d+", text), f"{spelling}: {text} should be the integer {expected}"
    else:
        assert text == str(expected), f"{spelling}: README says {cell!r}, the code {expected!r}"


def test_readme_has_an_option_table():
    assert len(ROWS) >= 10, "README: no option summary table of deepmask propose found"


@pytest.mark.parametrize("spelling", sorted(ROWS))
def test_readme_option_default_is_the_codes(spelling, monkeypatch):
    check_cell(spelling, ROWS[spelling], monkeypatch)


def test_readme_summarises_every_option():
    named = {s.partition("/")[0] for s in ROWS}
    missing = [p.opts[-1] for p in propose_cmd.params
               if getattr(p, "opts", None) and p.param_type_name == "option"
               and p.opts[-1] not in NOT_SUMMARISED and p.opts[-1] not in named]
    assert not missing, f"README's option table lacks {', '.join(missing)} (one short line each)"


def test_readme_names_the_values_the_shipped_weights_tune():
    """The shipped weights carry their tuned values in config.json, and the
    paragraph over the table names exactly the options they set."""
    tuned = load_weights(default_weights())[2].get("inference") or {}
    assert tuned, "the shipped weights carry no tuned inference values"
    option_of = {"scale_min": "--scales", "scale_max": "--scales", "scale_step": "--scales"}
    want = set()
    for field in tuned:
        opt = option_of.get(field) or next(p.opts[-1] for p in propose_cmd.params if p.name == field)
        want.add(opt)
    text = README.read_text(encoding="utf-8")
    intro = text[text.index("## `deepmask propose` options"):text.index("| option | default | meaning |")]
    named = set(re.findall(r"for the shipped weights ([^)]*)\)", " ".join(intro.split()))[0].replace("`", "").replace(",", " ").split())
    assert named == want, f"README says the shipped weights tune {sorted(named)}; their config.json tunes {sorted(want)}"
    assert any(_inference_value(f, SHIPPED_INFERENCE) != _inference_value(f, InferenceConfig()) for f in tuned)


def test_readme_size_and_ci_commands():
    data = README.read_bytes()
    assert len(data) <= MAX_BYTES, f"README.md is {len(data)} bytes; keep it to {MAX_BYTES} (details go to docs/)"
    text = data.decode("utf-8")
    for command in CI_COMMANDS:
        assert command in text, f"README must give CI's command verbatim: {command}"
