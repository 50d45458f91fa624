"""The `hydra-rank` command line."""

from __future__ import annotations

import contextlib
import json
import os
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from .errors import ConfigError, HydraError
from .methods import DEFAULT_METHOD, DEMO_METHODS, METHODS, REFERENCE_METHOD, describe_methods
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


MAX_ERROR = 1000  # characters: a message quoting user input never floods the terminal


@contextlib.contextmanager
def _user_errors() -> Iterator[None]:
    """Input errors become one red line and exit status 2 (a traceback only with --debug)."""
    try:
        yield
    except HydraError as error:
        if _state["debug"]:
            raise
        text = str(error)
        text = text if len(text) <= MAX_ERROR else f"{text[:MAX_ERROR]}... ({len(text) - MAX_ERROR} more characters)"
        console.print(f"[bold red]error:[/] {escape(text)}")
        raise typer.Exit(2) from None


def _numbers(text: str, option: str, kind: type) -> list:
    """A comma-separated list of numbers, or one clear error naming the option."""
    try:
        values = [kind(part) for part in text.split(",") if part.strip()]
    except ValueError:
        values = []
    if not values or (kind is float and not all(0 < v < float("inf") for v in values)):
        raise ConfigError(
            f"{option} expects comma-separated {'positive numbers' if kind is float else 'integers'}, got {text!r}"
        )
    return values


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
    resume: Annotated[
        bool, typer.Option(help="Continue the run in the output dir from its newest complete checkpoint.")
    ] = False,
) -> None:
    """Fine-tune with the method in CONFIG (adapter.method: see `hydra-rank methods`); writes config.yaml, log.jsonl,
    adapter/, metrics.json to the output dir.

    Set train.checkpoint_every to write checkpoints; after a crash, the same command with --resume continues exactly
    where the newest checkpoint left off (`train RUN/config.yaml --resume` continues RUN, also after it was moved).
    --overwrite replaces a previous run only once the new one has finished: a failed run leaves the old one intact."""
    with _user_errors():
        from .train import run

        if resume and output_dir is None and config.name == "config.yaml" and (config.parent / "checkpoints").is_dir():
            output_dir = config.parent  # a run's own config: continue that run where it is now, even if it moved
        cfg = _config(
            config, set_, **{"train.max_steps": max_steps, "train.output_dir": str(output_dir or "") or None}
        )
        _print_results([run(cfg, overwrite=overwrite, resume=resume).metrics])


@app.command("eval")
def eval_(
    target: Annotated[Path, typer.Argument(help="A run directory (uses its config.yaml and adapter/) or a config.")],
    adapter: Annotated[Path | None, typer.Option(help="PEFT adapter directory (default: TARGET/adapter).")] = None,
    set_: SetOption = None,
    output: Annotated[Path | None, typer.Option(help="Write metrics JSON here (default: TARGET/eval.json).")] = None,
) -> None:
    """Evaluate a base model or a saved adapter: exact-match accuracy, eval loss, majority baseline."""
    with _user_errors():
        from .commands import evaluate_saved
        from .utils import write_json

        run_dir = target if target.is_dir() else None
        cfg = _config(run_dir / "config.yaml" if run_dir else target, set_)
        own = run_dir / "adapter" if run_dir else None
        if adapter is None and own is not None and own.is_dir():
            adapter = own
        destination = output or _eval_destination(run_dir or Path(cfg.train.output_dir), adapter, own)
        if destination.is_dir():
            raise ConfigError(
                f"--output {destination} is a folder; give a file name, e.g. {destination / 'eval.json'}"
            )
        metrics = evaluate_saved(cfg, adapter)
        write_json(destination, metrics)
        _print_results([metrics])
        console.print(f"metrics written to {destination}")


def _eval_destination(folder: Path, adapter: Path | None, own: Path | None) -> Path:
    """FOLDER/eval.json, unless FOLDER holds a run and what is evaluated is not that run's adapter (another adapter,
    or the base model): those numbers must not replace the run's own eval.json."""
    evaluates_own = adapter is not None and own is not None and adapter.resolve() == own.resolve()
    if (folder / "config.yaml").is_file() and not evaluates_own:
        what = f"--adapter {adapter}" if adapter is not None else "the base model"
        raise ConfigError(
            f"{folder} holds a run and {what} is not its adapter: the metrics would replace that run's eval.json; "
            "pass --output FILE"
        )
    return folder / "eval.json"


# The demo's task: the scenes benchmark's cell at the rank-4 budget (configs/scenes.yaml), at the learning rate both
# methods chose on its validation split (4e-3), scored on all 300 of its test questions, so the demo's table is that
# cell's seed 0 (on a third of the questions the verdict flipped with which third: BENCHMARKS.md). Scenes, not
# easy-VQA, because it is the task where adapter capacity matters (uniform LoRA's eval loss keeps falling from rank 2
# to 8); on easy-VQA uniform LoRA gains almost nothing from rank 4 to 8, so there is little capacity to redistribute
# and a demo there cannot show what HyDRA is for (BENCHMARKS.md).
DEMO_SETTINGS = {
    "data.dataset": "scenes",
    "data.eval_samples": 300,
    "data.validation_samples": 300,
    "data.max_length": 160,
    "train.max_steps": 80,
    "train.lr": 4e-3,
    "eval.max_new_tokens": 48,
}


@app.command()
def demo(
    output_dir: Annotated[Path, typer.Option(help="Where the runs and the report go.")] = Path("runs/demo"),
    max_steps: Annotated[int | None, typer.Option(help="Override train.max_steps for every run.")] = None,
) -> None:
    """Uniform LoRA and HyDRA at the same parameter budget (uniform rank 4) on the built-in tiny VLM and the scenes
    task (the benchmark's capacity-sensitive task, at its tuned learning rate, seed 0); prints a side-by-side table
    and writes a report."""
    with _user_errors():
        from .bench import run_all
        from .report import write_report

        started = time.perf_counter()
        settings = {**DEMO_SETTINGS, **({"train.max_steps": max_steps} if max_steps is not None else {})}
        configs = [
            _config(None, [f"adapter.method={method}"], **settings, **{"train.output_dir": str(output_dir / method)})
            for method in DEMO_METHODS
        ]
        jobs = max(1, min(len(configs), os.cpu_count() or 1))
        console.print(f"training {', '.join(DEMO_METHODS)} side by side ({jobs} at a time, each in its own process)")
        rows = run_all(configs, output_dir, "results.json", jobs, reuse=False)
        runs = {method: output_dir / method for method in DEMO_METHODS}
        report = write_report(output_dir, runs, title="hydra-rank demo: uniform LoRA vs HyDRA, tiny VLM on scenes")
        _print_results(rows)
        console.print(f"report: {report}  (demo took {time.perf_counter() - started:.0f} s)")


@app.command()
def validate(
    config: Annotated[Path, typer.Argument(help="YAML run configuration to check.")],
    set_: SetOption = None,
) -> None:
    """Check a configuration and its data before a long run: config keys, model and targets, budget, and every
    sample (images readable and inside the image folder, placeholders, length). Exit status 2 on the first problem."""
    with _user_errors():
        from .validate import validate_config

        summary = validate_config(_config(config, set_))
        for key, value in summary.items():
            stdout.print(f"{key}: {value:,}" if isinstance(value, int) else f"{key}: {value}")
        console.print("[bold green]ok[/]: the configuration and data are ready to train")


@app.command()
def allocate(
    config: Annotated[Path, typer.Argument(help="YAML run configuration: model, data, adapter budget and bounds.")],
    output_dir: Annotated[Path, typer.Option(help="Where allocation.json and allocation.png go.")] = Path(
        "runs/allocation"
    ),
    set_: SetOption = None,
) -> None:
    """Calibrate on a few training batches and write the hierarchical rank allocation (JSON + heatmap).

    Train with it later via `--set adapter.allocation_path=DIR/allocation.json`.
    """
    with _user_errors():
        from .commands import allocate_for_config

        allocation, targets = allocate_for_config(_config(config, set_), output_dir)
        _print_allocation(allocation, targets)
        console.print(f"allocation written to {output_dir / 'allocation.json'} and {output_dir / 'allocation.png'}")


@app.command()
def export(
    run_dir: Annotated[Path, typer.Argument(help="A finished run directory (config.yaml + adapter/).")],
    output_dir: Annotated[Path | None, typer.Option(help="Default: RUN_DIR/export.")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace OUTPUT_DIR if it holds something else.")] = False,
    fmt: Annotated[
        str,
        typer.Option(
            "--format", help="hf: adapter + merged model; gguf: also OUTPUT_DIR/gguf for llama.cpp (docs/deploy.md)."
        ),
    ] = "hf",
    quant: Annotated[str, typer.Option(help="GGUF weights: f16, q8_0 or q4_k_m (needs make deploy-tools).")] = "f16",
) -> None:
    """Write a portable PEFT adapter (every module's scale folded into its weights: one global lora_alpha, no
    alpha_pattern, so tools such as llama.cpp's LoRA converter apply it correctly) and a merged model (adapter folded
    into the base weights) for serving; with --format gguf also the GGUF file for llama.cpp and the vision half
    (mmproj, or ONNX where llama.cpp has no runtime for the tower). A previous export of the same run is replaced; any
    other folder that holds files only with --overwrite, and a run folder never (its own adapter would be
    replaced)."""
    with _user_errors():
        from .export import export_run

        if fmt not in ("hf", "gguf"):
            raise ConfigError(f"--format {fmt} is not supported; choose hf or gguf")
        result = export_run(run_dir, output_dir or run_dir / "export", overwrite, quant if fmt == "gguf" else None)
        console.print(f"adapter: {result['adapter']}\nmerged model: {result['merged']}")
        console.print(
            f"checks against the run's adapter, largest logit difference: portable adapter "
            f"{result['adapter_max_logit_diff']:.2e}, merged model {result['max_logit_diff']:.2e}"
        )
        for kind in ("gguf", "mmproj", "onnx"):
            if kind in result:
                console.print(f"{kind}: {result[kind]}")
        if "onnx_max_diff" in result:
            console.print(f"ONNX vision half vs PyTorch, largest difference: {result['onnx_max_diff']:.2e}")


@app.command(
    help="Run every method x seed on the same model, data order, steps, schedule and budget (with --lrs: at each "
    "method's learning rate chosen on the validation split), and "
    "write results.json, a mean ± std markdown table (with per-seed differences against "
    f"{REFERENCE_METHOD}) and plots. Finished runs with an identical config are reused.\n\n"
    f"Methods:\n\n{describe_methods()}"
)
def bench(
    config: Annotated[Path, typer.Argument(help="Base YAML configuration shared by every run.")],
    methods: Annotated[str, typer.Option(help="Comma-separated methods (listed below).")] = ",".join(DEMO_METHODS),
    seeds: Annotated[str, typer.Option(help="Comma-separated seeds (the same seeds for every method).")] = "0,1,2",
    output_dir: Annotated[Path, typer.Option(help="Benchmark folder (runs, results.json, results.md, plots).")] = Path(
        "runs/bench"
    ),
    lrs: Annotated[
        str | None,
        typer.Option(
            help="Comma-separated learning rates: each method first trains at each of them on the first seed, scored "
            "on the validation split (data.validation_samples), and runs its seeds at the one with the lowest "
            "validation eval loss. A method whose best rate is the largest (smallest) also tries twice (half) that "
            "rate, up to two more, so no method is chosen at an edge it never looked past."
        ),
    ] = None,
    jobs: Annotated[int, typer.Option(help="Runs trained at the same time (each its own process).", min=1)] = 1,
    set_: SetOption = None,
) -> None:
    with _user_errors():
        from .bench import run_bench

        chosen = [m.strip() for m in methods.split(",") if m.strip()]
        if not chosen:
            raise ConfigError(f"--methods names no method ({methods!r}); e.g. --methods lora,hydra")
        unknown = sorted(set(chosen) - set(METHODS))
        if unknown:
            raise ConfigError(f"unknown method(s) {unknown}; choose from {', '.join(METHODS)}")
        seed_list = _numbers(seeds, "--seeds", int)
        lr_list = _numbers(lrs, "--lrs", float) if lrs else None
        result = run_bench(_config(config, set_), chosen, seed_list, output_dir, lrs=lr_list, jobs=jobs)
        stdout.print(result.table)
        console.print(f"results in {output_dir}/results.json, results.md and plots")


@app.command()
def matrix(
    folders: Annotated[
        list[Path], typer.Argument(help="Benchmark folders written by `hydra-rank bench` (one per task and budget).")
    ],
    output_dir: Annotated[Path, typer.Option(help="Where to write matrix.md and matrix.json.")] = Path("runs/bench"),
    method: Annotated[str, typer.Option(help="The method judged against the reference.")] = DEFAULT_METHOD,
    reference: Annotated[str, typer.Option(help="The uniform baseline.")] = REFERENCE_METHOD,
) -> None:
    """One line per (task, budget) cell from several benchmarks, judged against the reference's own rank sensitivity.

    A task counts as capacity-sensitive when the reference's test eval loss falls from its lowest to its highest
    budget by more than its largest seed std; there the method must have lower mean paired eval loss and not lower
    accuracy, elsewhere it may not be worse by more than one seed std on either metric."""
    with _user_errors():
        from .matrix import write_matrix

        stdout.print(write_matrix(folders, output_dir, method, reference), soft_wrap=True)
        console.print(f"matrix in {output_dir}/matrix.md and matrix.json")


@app.command()
def methods() -> None:
    """List the fine-tuning methods (the config key adapter.method) and what each one does."""
    from rich.table import Table

    table = Table(title="methods (adapter.method)")
    for column in ("method", "what it does", "ranks start from"):
        table.add_column(column)
    for method in METHODS.values():
        table.add_row(method.name, method.summary, method.start.value if method.start is not None else "-")
    stdout.print(table)


@app.command("make-scenes")
def make_scenes(
    output_dir: Annotated[Path, typer.Argument(help="Folder to write train.jsonl, test.jsonl and images/ into.")],
    seed: Annotated[int, typer.Option(help="Generation seed (the default task uses 0).")] = 0,
    overwrite: Annotated[bool, typer.Option(help="Replace OUTPUT_DIR if it already holds files.")] = False,
) -> None:
    """Write the generated multi-shape scenes task (data.dataset: scenes) as LLaVA JSONL + PNG files into a new or
    empty folder (an existing one only with --overwrite, replaced once the new files are complete)."""
    with _user_errors():
        from .data.scenes import generate
        from .utils import check_folder_target

        check_folder_target(output_dir, overwrite, "make-scenes")
        counts = generate(output_dir, seed)
        console.print(f"wrote {counts['train']} train and {counts['test']} test questions to {output_dir}")


@app.command()
def prepare(
    retrain_projector: Annotated[
        Path | None,
        typer.Option(
            help="Instead: run stage 1 of the tiny VLM here (a few minutes) and write its projector to this file; "
            "copied over src/hydra_rank/assets/tiny-vlm-projector.safetensors it becomes the shipped one."
        ),
    ] = None,
) -> None:
    """Build the built-in models into the cache now (they are otherwise built on first use), and print each one's
    cache key (the entry name: it changes with the code, libraries and source files that build it) and its weights'
    sha256, the identity every run's metrics.json records."""
    with _user_errors():
        from .builtin import BUILTINS, write_projector
        from .cache import cache_root
        from .inputs import model_identity

        started = time.perf_counter()
        if retrain_projector is not None:
            stats = write_projector(retrain_projector)
            console.print(f"wrote {retrain_projector} in {time.perf_counter() - started:.0f} s: {stats}")
            return
        console.print(f"cache: {cache_root()}")
        for name, build in BUILTINS.items():
            identity = model_identity(name, str(build()))
            stdout.print(f"{name}: {identity['source']}")
            for file, digest in identity["weights_sha256"].items():
                stdout.print(f"  {file} sha256 {digest}")
        console.print(f"ready in {time.perf_counter() - started:.0f} s")


def _print_allocation(allocation, targets) -> None:
    """Mean rank per module kind and parameter share per layer: the fine and the coarse decision at a glance."""
    from rich.table import Table

    kinds = Table(title=f"{allocation.info.get('method', '')} allocation: mean rank per module kind")
    names = list(dict.fromkeys(t.kind for t in targets))
    for name in names:
        kinds.add_column(name, justify="right")
    kinds.add_row(
        *(
            f"{sum(allocation.ranks[t.name] for t in targets if t.kind == n) / sum(t.kind == n for t in targets):.2f}"
            for n in names
        )
    )
    stdout.print(kinds)
    shares = allocation.info.get("layer_params", [])
    if shares:
        total = sum(shares)
        stdout.print("layer share of the budget (%): " + " ".join(f"{100 * s / total:.1f}" for s in shares))
    stdout.print(
        f"used {allocation.params(targets):,} of {allocation.budget:,} parameters; ranks "
        f"{min(allocation.ranks.values())}..{max(allocation.ranks.values())}; calibration "
        f"{allocation.info.get('calibration_seconds', 0):.1f} s"
    )


def _print_results(rows: list[dict]) -> None:
    from .report import results_table

    stdout.print(results_table(rows))
