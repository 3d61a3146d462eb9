"""The `loopchat` command line: each package contributes its own commands (its `cli.register`).

The loop's order reads in `loopchat --help`: serve, log (db, export, import), roll out
(adapters, ab), retrain (retrain, runs, demo, simulate).
"""

from __future__ import annotations

import typer

from feedback import cli as feedback_cli
from retrain import cli as retrain_cli
from rollout import cli as rollout_cli
from serving import cli as serving_cli

app = typer.Typer(help="loopchat: chat serving with a feedback loop.", no_args_is_help=True)
for package_cli in (serving_cli, feedback_cli, rollout_cli, retrain_cli):
    package_cli.register(app)


if __name__ == "__main__":
    app()
