"""`HydraTrainer` in every process of an `accelerate launch` (run by tests/test_multiprocess.py, not collected):
trains the config given as argument, then writes what this process holds (process-<rank>.json) and the adapter."""

import json
import sys
from pathlib import Path

from hydra_rank.config import load_config
from hydra_rank.hf_trainer import HydraTrainer
from hydra_rank.train import process_fingerprint
from tests.test_hf_trainer import trainer_for

config = load_config(sys.argv[1])
out = Path(config.train.output_dir)
trainer = trainer_for(config, config.model.name_or_path, out, HydraTrainer, hydra_debug_checks=True)
trainer.train()
fingerprint = process_fingerprint(trainer.model, trainer.hydra.scheduler.allocation)
(out / f"process-{trainer.args.process_index}.json").write_text(json.dumps(fingerprint))
trainer.save_model(str(out / "adapter"))
# Destroy the process group before the interpreter exits, as `hydra-rank train` does: gloo's worker threads torn down
# during interpreter shutdown can abort the process (SIGABRT after a finished run), most often on a busy machine.
trainer.accelerator.end_training()
