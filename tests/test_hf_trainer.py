"""HyDRA through Hugging Face's real `Trainer`: the built-in loop's decisions, a stock PEFT adapter at the end."""

import functools

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from torch.utils.data import Sampler
from transformers import TrainingArguments

from hydra_rank.config import AdapterConfig, ScheduleConfig
from hydra_rank.data import EncodedDataset, load_samples
from hydra_rank.data.encode import ChatEncoder, collate
from hydra_rank.data.sampler import ResumableSampler
from hydra_rank.errors import ConfigError
from hydra_rank.hf_trainer import HydraTrainer, with_hydra
from hydra_rank.inputs import load_model
from hydra_rank.rank.lora import lora_layers
from hydra_rank.train import run
from hydra_rank.utils import read_jsonl

from .test_train import tiny_config


class LoopOrder(Sampler[int]):
    """The built-in loop's sample stream, one epoch at a time (Trainer restarts its sampler every epoch)."""

    def __init__(self, size: int, seed: int) -> None:
        self.stream, self.epoch = ResumableSampler(size, seed), 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        return iter(self.stream.order(self.epoch))

    def __len__(self) -> int:
        return self.stream.size


class LoopOrderTrainer(HydraTrainer):
    def _get_train_sampler(self, train_dataset=None):
        return LoopOrder(len(self.train_dataset), self.args.seed)


def trainer_for(config, model_dir, output_dir, trainer_class=LoopOrderTrainer, **extra):
    model, processor = load_model(str(model_dir))
    encoder = ChatEncoder(processor, config.data.system_prompt, config.data.max_length)
    train_samples, _ = load_samples(config.data, config.train.seed)
    args = TrainingArguments(
        output_dir=str(output_dir),
        max_steps=config.train.max_steps,
        per_device_train_batch_size=config.train.batch_size,
        learning_rate=config.train.lr,
        lr_scheduler_type="cosine",
        warmup_steps=config.train.warmup_steps,
        optim="adamw_torch",
        max_grad_norm=config.train.max_grad_norm,
        seed=config.train.seed,
        use_cpu=True,
        remove_unused_columns=False,
        save_strategy="no",
        report_to=[],
        logging_steps=1,
        disable_tqdm=True,
    )
    return trainer_class(
        model=model,
        args=args,
        train_dataset=EncodedDataset(train_samples, encoder),
        data_collator=functools.partial(collate, pad_token_id=encoder.pad_token_id),
        hydra_adapter=config.adapter,
        hydra_schedule=config.schedule,
        **extra,
    )


def hydra_config(model_dir, dataset, output_dir, attribution="optimizer", curves="gradient"):
    # seed 1: with seed 0 Trainer's own seeded sampler happens to draw the built-in order, hiding order mistakes
    config = tiny_config(model_dir, dataset, output_dir, max_steps=8, warmup_steps=0, debug_checks=True, seed=1)
    config.adapter.method = "hydra"
    config.adapter.max_rank = 6
    config.schedule = ScheduleConfig(
        warmup_fraction=0.2, interval_fraction=0.2, freeze_fraction=0.9, attribution=attribution, curves=curves
    )
    return config


@pytest.mark.parametrize(("attribution", "curves"), [("optimizer", "gradient"), ("probe", "held_out")])
def test_trainer_makes_the_built_in_loops_decisions_and_saves_a_stock_adapter(
    tiny_llava_dir, colour_dataset, tmp_path, attribution, curves
):
    """The held-out options draw their probe batches through the Trainer's collator by the loop's indices, so they
    decide the same, too."""
    config = hydra_config(tiny_llava_dir, colour_dataset, tmp_path / "loop", attribution, curves)
    run(config, show_progress=False)
    loop = read_jsonl(tmp_path / "loop" / "allocation_history.jsonl")

    trainer = trainer_for(config, tiny_llava_dir, tmp_path / "trainer", hydra_debug_checks=True)
    trainer.train()
    hydra = read_jsonl(tmp_path / "trainer" / "allocation_history.jsonl")
    assert [entry["step"] for entry in hydra] == [entry["step"] for entry in loop] == [2, 4, 6]
    assert [entry["ranks"] for entry in hydra] == [entry["ranks"] for entry in loop]
    assert any(entry["resized_modules"] for entry in hydra[1:])  # later decisions resized, the optimizer was re-bound
    assert all(entry["used_params"] <= entry["budget_params"] for entry in hydra)
    loop_losses = [entry["loss"] for entry in read_jsonl(tmp_path / "loop" / "log.jsonl")]
    trainer_losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert trainer_losses == pytest.approx(loop_losses, rel=1e-5)

    trainer.save_model(str(tmp_path / "adapter"))
    # the same batches, schedule and resizes: the trained adapters agree (another data order fails this)
    loop_adapter = load_file(tmp_path / "loop" / "adapter" / "adapter_model.safetensors")
    trainer_adapter = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert loop_adapter.keys() == trainer_adapter.keys()
    for key, value in loop_adapter.items():
        torch.testing.assert_close(trainer_adapter[key], value, atol=2e-5, rtol=1e-3, msg=key)
    base, _ = load_model(str(tiny_llava_dir))
    reloaded = PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
    trained = trainer.model.eval()
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(3)])
    inputs = {key: value for key, value in batch.items() if key != "labels"}
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).logits, trained(**inputs).logits)
    assert (tmp_path / "trainer" / "allocation.json").exists()


def test_trainer_refuses_methods_it_cannot_run(tiny_llava_dir, colour_dataset, tmp_path):
    config = hydra_config(tiny_llava_dir, colour_dataset, tmp_path / "loop")
    config.adapter.method = "adalora"
    with pytest.raises(ConfigError, match="AdaLoraConfig"):
        trainer_for(config, tiny_llava_dir, tmp_path / "trainer")


def test_with_hydra_runs_inside_trl_sft_trainer(tokenizer, tmp_path):
    """The README's TRL recipe with the real package: SFTTrainer tokenizes chat records itself, HyDRA moves rank
    inside its training loop, and `save_model` writes an adapter that stock PEFT loads with the final ranks."""
    from datasets import Dataset
    from transformers import LlamaConfig, LlamaForCausalLM
    from trl import SFTConfig, SFTTrainer

    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
    )
    chats = [
        {
            "messages": [
                {"role": "user", "content": f"What is {a} plus {b}?"},
                {"role": "assistant", "content": f"{a + b}"},
            ]
        }
        for a in range(6)
        for b in range(4)
    ]
    args = SFTConfig(
        output_dir=str(tmp_path / "sft"),
        max_steps=8,
        per_device_train_batch_size=4,
        learning_rate=2e-3,
        max_length=64,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        disable_tqdm=True,
    )
    trainer = with_hydra(SFTTrainer)(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(chats),
        processing_class=tokenizer,
        hydra_adapter=AdapterConfig(rank=2, alpha=4, max_rank=6),
        hydra_schedule=ScheduleConfig(warmup_fraction=0.2, interval_fraction=0.2, freeze_fraction=0.9),
        hydra_debug_checks=True,
    )
    trainer.train()
    history = read_jsonl(tmp_path / "sft" / "allocation_history.jsonl")
    assert [entry["step"] for entry in history] == [2, 4, 6]
    assert any(entry["resized_modules"] for entry in history[1:])
    assert all(entry["used_params"] <= entry["budget_params"] for entry in history)

    trainer.save_model(str(tmp_path / "adapter"))
    reloaded = PeftModel.from_pretrained(model.__class__(model.config), str(tmp_path / "adapter"))
    ranks = {name: layer.r["default"] for name, layer in lora_layers(reloaded).items()}
    assert ranks == {name: rank for name, rank in history[-1]["ranks"].items() if rank > 0}
