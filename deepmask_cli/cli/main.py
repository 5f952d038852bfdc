"""The ``deepmask`` command: a thin layer of click over the library.

Options default to ``None`` ("not given") so the dataclass defaults, or the
tuned defaults a weights folder carries, win unless the user sets something.
Each command lives in the module of its family and calls the library.
"""

from __future__ import annotations

import warnings

import click

from deepmask_cli import __version__
from deepmask_cli.cli.common import show_warning
from deepmask_cli.cli.evaluate import eval_cmd, tune_cmd
from deepmask_cli.cli.export import compress, quantize
from deepmask_cli.cli.propose import merge, propose, viz
from deepmask_cli.cli.train import export, train
from deepmask_cli.cli.weights import weights


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="deepmask")
def main() -> None:
    """DeepMask object proposals: class-agnostic masks for every object in a photo."""
    warnings.showwarning = show_warning


for _command in (propose, viz, eval_cmd, merge, train, export, quantize, compress, tune_cmd, weights):
    main.add_command(_command)
