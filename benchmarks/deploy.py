"""Deployment figures for BENCHMARKS.md: does the GGUF that `hydra-rank export --format gguf` writes answer like the
PyTorch model it came from, how large is each file, and how fast does it generate?

For a finished run (default: the text task's, trained here first if missing), every quantization is exported with
llama.cpp's own tools; each eval question's prompt (the same token ids) is answered greedily by the merged PyTorch
model and by llama.cpp (llama-cpp-python), both with --threads threads, and the answers are compared, also with the
PyTorch model whose weights were rounded to f16 (what an f16 file can at best reproduce). Prints a table and
writes deploy.json next to the export. Needs `make deploy-tools` (the compiled llama.cpp) for q4_k_m and for running
the GGUF files; without it, only the sizes of f16 and q8_0 are measured, and the table says so.

    .venv/bin/python benchmarks/deploy.py [--run runs/deploy-text] [--samples 300]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import time
from pathlib import Path

import torch

from hydra_rank.config import load_config
from hydra_rank.deploy import LLAMA_CPP_PYTHON, QUANTS
from hydra_rank.evaluate import generate_answers, normalize_answer
from hydra_rank.export import export_run
from hydra_rank.inputs import load_inputs, load_model
from hydra_rank.train import run

ROOT = Path(__file__).resolve().parents[1]


def finished_run(path: Path) -> Path:
    """The run to deploy: trained from configs/text-tasks.yaml into `path` unless it is already there."""
    if not (path / "metrics.json").is_file():
        config = load_config(ROOT / "configs" / "text-tasks.yaml")
        config.train.output_dir = str(path)
        run(config)
    return path


def size_mb(path: Path) -> float:
    files = [path] if path.is_file() else [f for f in path.rglob("*") if f.is_file()]
    return sum(f.stat().st_size for f in files) / 2**20


def llama_answers(
    gguf: Path, prompts: list[list[int]], eos: int, max_new_tokens: int, threads: int
) -> tuple[list[list[int]], float]:
    """Greedy continuations of every prompt in llama.cpp, and generated tokens per second."""
    from llama_cpp import Llama

    llm = Llama(str(gguf), n_ctx=512, n_threads=threads, n_threads_batch=threads, seed=0, verbose=False)
    outputs, tokens, seconds = [], 0, 0.0
    for prompt in prompts:
        llm.reset()
        started = time.perf_counter()
        generated: list[int] = []
        for token in llm.generate(prompt, temp=0.0, top_k=1, reset=True):
            if token == eos or len(generated) == max_new_tokens:
                break
            generated.append(token)
        seconds += time.perf_counter() - started
        tokens += len(generated)
        outputs.append(generated)
    return outputs, tokens / seconds


def exported(run_dir: Path, quant: str) -> dict[str, str]:
    """The run's export at `quant`: made with `hydra-rank export --format gguf`, or the one a previous call made."""
    folder = run_dir / f"export-{quant}"
    gguf = folder / "gguf" / f"model-{quant}.gguf"
    if (folder / "export.json").is_file() and gguf.is_file():
        return {"adapter": str(folder / "adapter"), "merged": str(folder / "merged"), "gguf": str(gguf)}
    return export_run(run_dir, folder, overwrite=True, quant=quant)


def agreement(answers: list[str], others: list[str]) -> float:
    """The share of answers that are the same after normalisation."""
    return sum(normalize_answer(a) == normalize_answer(b) for a, b in zip(answers, others, strict=True)) / len(answers)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, default=ROOT / "runs" / "deploy-text")
    parser.add_argument("--samples", type=int, default=300)
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="for PyTorch and llama.cpp alike")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    run_dir = finished_run(args.run)
    runtime = importlib.util.find_spec("llama_cpp") is not None
    quants = QUANTS if runtime else tuple(q for q in QUANTS if q != "q4_k_m")

    config = load_config(run_dir / "config.yaml")
    inputs = load_inputs(config)
    samples = inputs.eval_samples[: args.samples]
    items = [inputs.encoder.encode(s) for s in samples]
    tokenizer, steps = inputs.encoder.tokenizer, config.eval.max_new_tokens
    references = [normalize_answer(s.answer) for s in samples]

    exports = {quant: exported(run_dir, quant) for quant in quants}
    merged_dir = Path(exports[quants[0]]["merged"])
    merged, _ = load_model(str(merged_dir))
    started = time.perf_counter()
    torch_answers = generate_answers(merged, inputs.encoder, items, batch_size=1, max_new_tokens=steps)
    torch_seconds = time.perf_counter() - started
    torch_tokens = sum(len(tokenizer(a, add_special_tokens=False).input_ids) + 1 for a in torch_answers)
    # the same model with every weight rounded to f16 and back: what an f16 GGUF can at best reproduce
    with torch.no_grad():
        for parameter in merged.parameters():
            parameter.copy_(parameter.half().float())
    rounded_answers = generate_answers(merged, inputs.encoder, items, batch_size=1, max_new_tokens=steps)

    rows = [
        {"file": "adapter (portable PEFT)", "size_mb": size_mb(Path(exports[quants[0]]["adapter"]))},
        {
            "file": "merged (PyTorch, fp32)",
            "size_mb": size_mb(merged_dir / "model.safetensors"),
            "accuracy": agreement(torch_answers, references),
            "tokens_per_s": torch_tokens / torch_seconds,
        },
    ]
    prompts = [item.input_ids[: item.prompt_length] for item in items]
    for quant in quants:
        gguf = Path(exports[quant]["gguf"])
        row = {"file": f"GGUF {quant}", "size_mb": size_mb(gguf)}
        if runtime:
            generated, speed = llama_answers(gguf, prompts, tokenizer.eos_token_id, steps, args.threads)
            answers = [normalize_answer(tokenizer.decode(t, skip_special_tokens=True)) for t in generated]
            row |= {
                "same_as_pytorch": agreement(answers, torch_answers),
                "same_as_pytorch_f16_weights": agreement(answers, rounded_answers),
                "accuracy": agreement(answers, references),
            }
            row["tokens_per_s"] = speed
        rows.append(row)

    result = {
        "run": str(run_dir),
        "samples": len(samples),
        "llama_cpp_python": LLAMA_CPP_PYTHON if runtime else None,
        "threads": args.threads,
        "pytorch_f16_weights_same_as_pytorch": agreement(rounded_answers, torch_answers),
        "rows": rows,
    }
    (run_dir / "deploy.json").write_text(json.dumps(result, indent=2))
    print(
        "| file | size (MB) | same greedy answer as PyTorch | same as PyTorch with f16-rounded weights | accuracy "
        "| tokens/s |\n|---|---|---|---|---|---|"
    )
    for row in rows:
        cells = [f"{row['size_mb']:.1f}"]
        keys = ("same_as_pytorch", "same_as_pytorch_f16_weights", "accuracy")
        cells += [f"{row[k]:.3f}" if k in row else "-" for k in keys]
        cells.append(f"{row['tokens_per_s']:.0f}" if "tokens_per_s" in row else "-")
        print(f"| {row['file']} | " + " | ".join(cells) + " |")
    if not runtime:
        print("llama.cpp's runtime is not installed (make deploy-tools): GGUF answers, speed and q4_k_m not measured")


if __name__ == "__main__":
    main()
