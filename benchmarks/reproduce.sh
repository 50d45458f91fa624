#!/usr/bin/env bash
# Every measurement in BENCHMARKS.md (its easy-VQA rank 4 row is `make demo`). Each `hydra-rank bench` call prints
# its table and writes results.json / results.md / plots under runs/bench/; finished runs with an identical config are
# reused, so the script can be stopped and started again. On 2 CPU cores a scenes run takes 10-15 minutes: all of it
# ~4 hours.
set -euo pipefail
cd "$(dirname "$0")/.."
BENCH=".venv/bin/hydra-rank bench"

# headline (make bench): the rank-sensitive scenes task, budget = uniform rank 4, three seeds
$BENCH configs/scenes.yaml --methods lora,hydra --seeds 0,1,2 --output-dir runs/bench/scenes-r4
# every method on the same task (seed 0); lora and hydra seed 0 are the headline's runs
$BENCH configs/scenes.yaml --methods lora,hydra,hydra-static,hydra-coarse,hydra-fine,adalora,full --seeds 0 \
  --output-dir runs/bench/scenes-r4
# rank sensitivity of uniform LoRA on scenes (alpha = 2 r: the same scale at every rank)
$BENCH configs/scenes.yaml --methods lora --seeds 0 --set adapter.rank=1 --set adapter.alpha=2 \
  --output-dir runs/bench/scenes-sensitivity-r1
# ranks 2 and 8 of the sensitivity check, with HyDRA at those budgets
for rank in 2 8; do
  $BENCH configs/scenes.yaml --methods lora,hydra --seeds 0 --set adapter.rank=$rank --set adapter.alpha=$((2 * rank)) \
    --output-dir runs/bench/scenes-r$rank
done
# secondary tasks: easy-VQA at the budgets of uniform rank 2 and 8, text-only SmolLM2 on generated string tasks
for rank in 2 8; do
  $BENCH configs/tiny-hydra.yaml --methods lora,hydra --seeds 0 --set adapter.rank=$rank --set adapter.alpha=$((2 * rank)) \
    --output-dir runs/bench/easyvqa-r$rank
done
$BENCH configs/text-tasks.yaml --methods lora,hydra --seeds 0,1 --output-dir runs/bench/text-r4
