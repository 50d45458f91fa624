"""`python -m hydra_rank` runs the CLI (used to start isolated training runs with the current interpreter)."""

from .cli import app

app(prog_name="hydra-rank")
