"""The `hydra-rank` command line."""

from __future__ import annotations

import contextlib
import json
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from .errors import HydraError
from .utils import console

# Results go to stdout (wide enough for the table when piped to a file); progress and messages go to stderr.
stdout = Console(width=None if Console().is_terminal else 120)

app = typer.Typer(
    help="HyDRA: hierarchical and dynamic rank adaptation for fine-tuning vision-language models with LoRA.\n\n"
    "Start with `hydra-rank demo`; train your own with `hydra-rank train CONFIG.yaml`.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
_state = {"debug": False}

SetOption = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override a config key, e.g. --set train.lr=1e-3 (repeatable; value parsed as YAML)."),
]


@app.callback()
def main(
    debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks for input errors.")] = False,
) -> None:
    _state["debug"] = debug
    _quiet_libraries()


def _quiet_libraries() -> None:
    """Keep the terminal for our progress and results: library progress bars and deprecation chatter go."""
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module="peft")


@contextlib.contextmanager
def _user_errors() -> Iterator[None]:
    """Input errors become one red line and exit status 2 (a traceback only with --debug)."""
    try:
        yield
    except HydraError as error:
        if _state["debug"]:
            raise
        console.print(f"[bold red]error:[/] {error}")
        raise typer.Exit(2) from None


def _config(path: Path | None, overrides: list[str] | None, **extra: object):
    from .config import load_config

    sets = list(overrides or [])
    sets += [f"{key}={json.dumps(value)}" for key, value in extra.items() if value is not None]
    return load_config(path, sets)


@app.command()
def train(
    config: Annotated[Path, typer.Argument(help="YAML run configuration (see configs/).")],
    max_steps: Annotated[int | None, typer.Option(help="Override train.max_steps.")] = None,
    output_dir: Annotated[Path | None, typer.Option(help="Override train.output_dir.")] = None,
    set_: SetOption = None,
    overwrite: Annotated[bool, typer.Option(help="Replace the results of a previous run in the output dir.")] = False,
) -> None:
    """Fine-tune with the method in CONFIG; writes config.yaml, log.jsonl, adapter/, metrics.json to the output dir."""
    with _user_errors():
        from .train import run

        cfg = _config(
            config, set_, **{"train.max_steps": max_steps, "train.output_dir": str(output_dir or "") or None}
        )
        _print_results([run(cfg, overwrite=overwrite).metrics])


@app.command("eval")
def eval_(
    target: Annotated[Path, typer.Argument(help="A run directory (uses its config.yaml and adapter/) or a config.")],
    adapter: Annotated[Path | None, typer.Option(help="PEFT adapter directory (default: TARGET/adapter).")] = None,
    set_: SetOption = None,
    output: Annotated[Path | None, typer.Option(help="Write metrics JSON here (default: TARGET/eval.json).")] = None,
) -> None:
    """Evaluate a base model or a saved adapter: exact-match accuracy, eval loss, majority baseline."""
    with _user_errors():
        from .evaluate import evaluate_saved

        run_dir = target if target.is_dir() else None
        cfg = _config(run_dir / "config.yaml" if run_dir else target, set_)
        if adapter is None and run_dir and (run_dir / "adapter").is_dir():
            adapter = run_dir / "adapter"
        from .utils import write_json

        metrics = evaluate_saved(cfg, adapter)
        destination = output or (run_dir or Path(cfg.train.output_dir)) / "eval.json"
        write_json(destination, metrics)
        _print_results([metrics])
        console.print(f"metrics written to {destination}")


@app.command()
def demo(
    output_dir: Annotated[Path, typer.Option(help="Where the runs and the report go.")] = Path("runs/demo"),
    max_steps: Annotated[int | None, typer.Option(help="Override train.max_steps for every run.")] = None,
) -> None:
    """The embedded default: the built-in tiny VLM fine-tuned on easy-VQA; prints a result table, writes a report."""
    with _user_errors():
        from .report import write_report
        from .runner import run_isolated

        started = time.perf_counter()
        runs, rows = {}, []
        for method in ("lora",):
            cfg = _config(
                None,
                [f"adapter.method={method}"],
                **{"train.output_dir": str(output_dir / method), "train.max_steps": max_steps},
            )
            console.rule(f"[bold]{method}")
            rows.append(run_isolated(cfg, output_dir / "configs" / f"{method}.yaml"))
            runs[method] = output_dir / method
        report = write_report(output_dir, runs, title="hydra-rank demo: tiny VLM on easy-VQA")
        _print_results(rows)
        console.print(f"report: {report}  (demo took {time.perf_counter() - started:.0f} s)")


@app.command()
def prepare() -> None:
    """Build the built-in models into the cache now (they are otherwise built on first use)."""
    with _user_errors():
        from .models.tiny_vlm import cache_root, smollm2_path, tiny_vlm_path

        started = time.perf_counter()
        console.print(f"cache: {cache_root()}")
        console.print(f"builtin:smollm2  -> {smollm2_path()}")
        console.print(f"builtin:tiny-vlm -> {tiny_vlm_path()}")
        console.print(f"ready in {time.perf_counter() - started:.0f} s")


def _print_results(rows: list[dict]) -> None:
    from .report import results_table

    stdout.print(results_table(rows))
