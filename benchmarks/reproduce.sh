#!/usr/bin/env bash
# Every measurement in BENCHMARKS.md, in the order it was taken. Each `hydra-rank bench` call prints its table and
# writes results.json / results.md / plots under runs/bench/; finished runs with an identical config are reused, so
# the script can be stopped and started again. On 2 CPU cores a scenes run takes about 10 minutes: all of it ~3 hours.
set -euo pipefail
cd "$(dirname "$0")/.."
BENCH=".venv/bin/hydra-rank bench"

# headline (make bench): the rank-sensitive scenes task, budget = uniform rank 4, three seeds
$BENCH configs/scenes.yaml --methods lora,hydra --seeds 0,1,2 --output-dir runs/bench/scenes-r4
# more methods on the same task (seed 0)
$BENCH configs/scenes.yaml --methods lora,hydra,hydra-static,adalora --seeds 0 --output-dir runs/bench/scenes-r4
# rank sensitivity of uniform LoRA on scenes (alpha = 2 r: the same scale at every rank)
for rank in 1 2 8; do
  $BENCH configs/scenes.yaml --methods lora --seeds 0 --set adapter.rank=$rank --set adapter.alpha=$((2 * rank)) \
    --output-dir runs/bench/scenes-sensitivity-r$rank
done
# secondary tasks: easy-VQA at a low budget (uniform rank 2), text-only SmolLM2 on generated string tasks
$BENCH configs/tiny-hydra.yaml --methods lora,hydra --seeds 0 --set adapter.rank=2 --set adapter.alpha=4 \
  --output-dir runs/bench/easyvqa-r2
$BENCH configs/text-tasks.yaml --methods lora,hydra --seeds 0 --output-dir runs/bench/text-r4
