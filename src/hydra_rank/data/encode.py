"""From a `Sample` to model tensors: the tokenizer's own chat template, loss on answer tokens only, padded batches.

The chat is rendered with the tokenizer's template one assistant turn at a time. Each assistant reply is the text the
template adds between "prompt with generation prompt" and "prompt plus reply", so we never hard-code a model's chat
markup. Text pieces are tokenized separately (through the processor when they hold images, so it expands each
`<image>` into the right number of image tokens), which is exactly how a prompt is tokenized at generation time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..errors import DataError
from .sample import IMAGE_PLACEHOLDER, Sample, load_image

IGNORE_INDEX = -100


@dataclass
class Encoded:
    """One tokenized sample. `prompt_length` is where the final answer starts (what generation is given)."""

    input_ids: list[int]
    labels: list[int]
    prompt_length: int
    vision: dict[str, torch.Tensor]  # processor outputs other than text (pixel_values, image_grid_thw, ...)


class ChatEncoder:
    """Turns samples into token ids and label masks with a processor (VLM) or a bare tokenizer (text-only LM)."""

    def __init__(self, processor: Any, system_prompt: str | None = None, max_length: int = 256) -> None:
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        if not getattr(self.tokenizer, "chat_template", None):
            raise DataError(
                "the tokenizer has no chat template; use an instruct/chat checkpoint or set tokenizer.chat_template"
            )
        self.system_prompt = system_prompt
        self.max_length = max_length
        self.pad_token_id = self.tokenizer.pad_token_id
        if self.pad_token_id is None:
            self.pad_token_id = self.tokenizer.eos_token_id

    def segments(self, sample: Sample) -> list[tuple[str, bool]]:
        """The rendered chat as (text, is_answer) pieces, in order, ending with the final answer."""
        messages = list(sample.messages)
        if self.system_prompt is not None and messages[0]["role"] != "system":
            messages.insert(0, {"role": "system", "content": self.system_prompt})
        render = self.tokenizer.apply_chat_template
        pieces: list[tuple[str, bool]] = []
        done = ""
        for index, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            prompt = render(messages[:index], add_generation_prompt=True, tokenize=False)
            full = render(messages[: index + 1], tokenize=False)
            if not (prompt.startswith(done) and full.startswith(prompt)):
                raise DataError(
                    "the tokenizer's chat template does not render conversations prefix by prefix, so answer tokens"
                    " cannot be located; use a template where each turn appends to the previous text"
                )
            # Whitespace the template puts after a reply is glue before the next turn, not part of the answer.
            answer = full[len(prompt) :].rstrip()
            pieces += [(prompt[len(done) :], False), (answer, True)]
            done = prompt + answer
        return pieces

    def _tokenize(self, text: str, images: list) -> tuple[list[int], dict[str, torch.Tensor]]:
        if not images:
            return self.tokenizer(text, add_special_tokens=False)["input_ids"], {}
        out = self.processor(text=text, images=images, add_special_tokens=False, return_tensors="pt")
        ids = out.pop("input_ids")[0].tolist()
        out.pop("attention_mask", None)
        return ids, dict(out)

    def encode(self, sample: Sample) -> Encoded:
        images = [load_image(path, sample.source) for path in sample.images]
        input_ids: list[int] = []
        labels: list[int] = []
        vision: dict[str, list[torch.Tensor]] = {}
        prompt_length = 0
        for text, is_answer in self.segments(sample):
            count = text.count(IMAGE_PLACEHOLDER)
            ids, extra = self._tokenize(text, images[:count])
            images = images[count:]
            for key, value in extra.items():
                vision.setdefault(key, []).append(value)
            if is_answer:
                prompt_length = len(input_ids)
            input_ids += ids
            labels += ids if is_answer else [IGNORE_INDEX] * len(ids)
        if len(input_ids) > self.max_length:
            raise DataError(
                f"sample ({sample.source or 'no source'}) is {len(input_ids)} tokens, more than data.max_length="
                f"{self.max_length}; raise data.max_length or shorten the sample"
            )
        return Encoded(input_ids, labels, prompt_length, {k: torch.cat(v) for k, v in vision.items()})


def collate(items: list[Encoded], pad_token_id: int, *, prompt_only: bool = False) -> dict[str, torch.Tensor]:
    """Pad a batch. Training batches are right-padded with labels; generation batches (`prompt_only`) hold only the
    prompt and are left-padded, so every row's next token is predicted at the same last position."""
    rows = [item.input_ids[: item.prompt_length] if prompt_only else item.input_ids for item in items]
    width = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    for i, (row, item) in enumerate(zip(rows, items, strict=True)):
        span = slice(width - len(row), width) if prompt_only else slice(0, len(row))
        input_ids[i, span] = torch.tensor(row)
        attention_mask[i, span] = 1
        if not prompt_only:
            labels[i, span] = torch.tensor(item.labels)
    batch = {"input_ids": input_ids, "attention_mask": attention_mask}
    if not prompt_only:
        batch["labels"] = labels
    for key in sorted({key for item in items for key in item.vision}):
        batch[key] = torch.cat([item.vision[key] for item in items if key in item.vision])
    return batch
