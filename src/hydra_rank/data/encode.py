"""From a `Sample` to model tensors: the tokenizer's own chat template, loss on answer tokens only, padded batches.

The chat is rendered with the tokenizer's template one assistant turn at a time. Each assistant reply is the text the
template adds between "prompt with generation prompt" and "prompt plus reply", so we never hard-code a model's chat
markup. Text pieces are tokenized separately (through the processor when they hold images, so it expands each
`<image>` into the right number of image tokens), which is exactly how a prompt is tokenized at generation time.

Samples always write an image as `<image>`; the family's registry entry (`models/arch.py`) or its processor's
`image_token` says what the processor expects instead (Gemma 3: `<start_of_image>`, Qwen2-VL: vision markers around
`<|image_pad|>`). Processor outputs are either image tensors (`pixel_values`, `image_grid_thw`, `image_sizes`,
`pixel_attention_mask`, ...), concatenated over images, or one value per token (`token_type_ids`,
`mm_token_type_ids`), concatenated and padded along the sequence like the token ids.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import DataError
from ..loss import IGNORE_INDEX
from ..models.arch import processor_spec
from .sample import IMAGE_PLACEHOLDER, Sample, load_image

# Processor outputs with one value per token: which tokens are image tokens (Qwen2-VL's M-RoPE positions, Gemma 3's
# bidirectional attention over an image) or PaliGemma's prefix. Text the processor never sees is a text token (0).
TOKEN_TYPE_KEYS = ("token_type_ids", "mm_token_type_ids")


@dataclass
class Encoded:
    """One tokenized sample. `prompt_length` is where the final answer starts (what generation is given)."""

    input_ids: list[int]
    labels: list[int]
    prompt_length: int
    vision: dict[str, torch.Tensor]  # processor outputs other than text (pixel_values, image_grid_thw, ...)
    token_types: dict[str, list[int]] = field(default_factory=dict)  # TOKEN_TYPE_KEYS, one value per input id


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
        spec = processor_spec(processor)
        family_text = spec.image_text if spec is not None else None
        self.image_text = family_text or getattr(processor, "image_token", IMAGE_PLACEHOLDER)
        self.prefix_lm = spec is not None and spec.prefix_lm

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

    def _tokenize(self, text: str, images: list) -> tuple[list[int], dict[str, torch.Tensor], dict[str, list[int]]]:
        """(token ids, image tensors, per-token outputs) of one text piece."""
        if not images:
            return self.tokenizer(text, add_special_tokens=False)["input_ids"], {}, {}
        text = text.replace(IMAGE_PLACEHOLDER, self.image_text)
        out = self.processor(text=text, images=images, add_special_tokens=False, return_tensors="pt")
        ids = out.pop("input_ids")[0].tolist()
        out.pop("attention_mask", None)
        out.pop("labels", None)  # PaliGemma's processor derives labels of its own; ours cover the answers only
        token_types = {key: out.pop(key)[0].tolist() for key in TOKEN_TYPE_KEYS if key in out}
        return ids, dict(out), token_types

    def _token_types(self, spans: list[tuple[int, dict[str, list[int]], bool]]) -> dict[str, list[int]]:
        """Per-token outputs over the whole sample from each piece's (length, outputs, after the first answer).
        Pieces the processor did not see are text (0); in a prefix LM everything from the first answer on is the
        causal suffix (1), and every sample carries `token_type_ids`, images or not."""
        keys = {key for _, types, _ in spans for key in types} | ({"token_type_ids"} if self.prefix_lm else set())
        merged: dict[str, list[int]] = {}
        for key in sorted(keys):
            merged[key] = []
            for length, types, suffix in spans:
                merged[key] += [1] * length if self.prefix_lm and suffix else types.get(key, [0] * length)
        return merged

    def encode(self, sample: Sample) -> Encoded:
        images = [load_image(path, sample.source) for path in sample.images]
        input_ids: list[int] = []
        labels: list[int] = []
        vision: dict[str, list[torch.Tensor]] = {}
        spans: list[tuple[int, dict[str, list[int]], bool]] = []
        answered = False
        prompt_length = 0
        for text, is_answer in self.segments(sample):
            count = text.count(IMAGE_PLACEHOLDER)
            ids, extra, token_types = self._tokenize(text, images[:count])
            images = images[count:]
            for key, value in extra.items():
                vision.setdefault(key, []).append(value)
            answered = answered or is_answer
            spans.append((len(ids), token_types, answered))
            if is_answer:
                prompt_length = len(input_ids)
            input_ids += ids
            labels += ids if is_answer else [IGNORE_INDEX] * len(ids)
        if len(input_ids) > self.max_length:
            raise DataError(
                f"sample ({sample.source or 'no source'}) is {len(input_ids)} tokens, more than data.max_length="
                f"{self.max_length}; raise data.max_length or shorten the sample"
            )
        vision_tensors = {key: _concat(values) for key, values in vision.items()}
        return Encoded(input_ids, labels, prompt_length, vision_tensors, self._token_types(spans))


def _concat(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Concatenate image tensors along dim 0, zero-padding the other dims to the largest. Processors pad the same way
    when they batch (LLaVA-NeXT: crops per image, Idefics3: tiles per image), and the models skip the padding."""
    shape = [max(sizes) for sizes in zip(*(tensor.shape[1:] for tensor in tensors), strict=True)]
    if all(list(tensor.shape[1:]) == shape for tensor in tensors):
        return torch.cat(tensors)
    out = tensors[0].new_zeros((sum(len(tensor) for tensor in tensors), *shape))
    start = 0
    for tensor in tensors:
        out[(slice(start, start + len(tensor)), *(slice(0, size) for size in tensor.shape[1:]))] = tensor
        start += len(tensor)
    return out


def collate(items: list[Encoded], pad_token_id: int, *, prompt_only: bool = False) -> dict[str, torch.Tensor]:
    """Pad a batch. Training batches are right-padded with labels; generation batches (`prompt_only`) hold only the
    prompt and are left-padded, so every row's next token is predicted at the same last position."""
    rows = [item.input_ids[: item.prompt_length] if prompt_only else item.input_ids for item in items]
    width = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    token_types = {
        key: torch.zeros((len(rows), width), dtype=torch.long) for item in items for key in item.token_types
    }
    for i, (row, item) in enumerate(zip(rows, items, strict=True)):
        span = slice(width - len(row), width) if prompt_only else slice(0, len(row))
        input_ids[i, span] = torch.tensor(row)
        attention_mask[i, span] = 1
        if not prompt_only:
            labels[i, span] = torch.tensor(item.labels)
        for key, values in item.token_types.items():
            token_types[key][i, span] = torch.tensor(values[: len(row)])
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, **dict(sorted(token_types.items()))}
    if not prompt_only:
        batch["labels"] = labels
    for key in sorted({key for item in items for key in item.vision}):
        batch[key] = _concat([item.vision[key] for item in items if key in item.vision])
    return batch
