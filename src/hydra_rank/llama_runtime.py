"""Run an exported GGUF and its mmproj in llama.cpp's own multimodal runtime (mtmd, through llama-cpp-python) and
read the logits, so that an export can be checked against the PyTorch model it came from.

llama.cpp prepares the image itself (from raw RGB) and places the image embeddings between the family's own
markers; `multimodal_logits` returns the token ids it used, with each image position as `image_token_id`, so the
same sequence can be given to the PyTorch model. Needs the compiled binding (`make deploy-tools`).
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np

from .errors import ConfigError

TEXT_CHUNK = 0  # mtmd_input_chunk_type: MTMD_INPUT_CHUNK_TYPE_TEXT


def multimodal_logits(
    gguf: Path, mmproj: Path, prompt: str, image: np.ndarray, image_token_id: int
) -> tuple[list[int], np.ndarray]:
    """(token ids, next-token logits after the last one) for `prompt` with `image` (height x width x 3, uint8) at
    llama.cpp's media marker, appended when the prompt has none."""
    try:
        import llama_cpp
        from llama_cpp import mtmd_cpp as mtmd
    except ImportError:
        raise ConfigError("running GGUF files needs the compiled llama-cpp-python: make deploy-tools") from None
    llama_cpp.llama_backend_init()
    model = llama_cpp.llama_model_load_from_file(str(gguf).encode(), llama_cpp.llama_model_default_params())
    if not model:
        raise ConfigError(f"llama.cpp could not load {gguf}")
    params = mtmd.mtmd_context_params_default()
    params.use_gpu, params.n_threads, params.print_timings, params.warmup = False, 1, False, False
    context = mtmd.mtmd_init_from_file(str(mmproj).encode(), model, params)  # with the model: it reads its width
    if not context:
        llama_cpp.llama_model_free(model)
        raise ConfigError(f"llama.cpp could not load {mmproj} for {gguf}")
    marker = mtmd.mtmd_default_marker()
    text_bytes = prompt.encode() if marker.decode() in prompt else prompt.encode() + marker
    buffer = ctypes.create_string_buffer(text_bytes)
    text = mtmd.mtmd_input_text()
    text.text, text.text_len, text.add_special, text.parse_special = (
        ctypes.cast(buffer, ctypes.c_char_p),
        len(text_bytes),
        True,
        True,
    )
    height, width, _ = image.shape
    pixels = np.ascontiguousarray(image, dtype=np.uint8)
    bitmap = mtmd.mtmd_bitmap_init(width, height, (ctypes.c_uint8 * pixels.size).from_buffer_copy(pixels.tobytes()))
    chunks = mtmd.mtmd_input_chunks_init()
    lctx = None
    try:
        if mtmd.mtmd_tokenize(context, chunks, ctypes.byref(text), (mtmd.mtmd_bitmap_p_ctypes * 1)(bitmap), 1):
            raise ConfigError("llama.cpp could not tokenize the prompt with its image")
        ids: list[int] = []
        for index in range(mtmd.mtmd_input_chunks_size(chunks)):
            chunk = mtmd.mtmd_input_chunks_get(chunks, index)
            if mtmd.mtmd_input_chunk_get_type(chunk) == TEXT_CHUNK:
                count = ctypes.c_size_t()
                tokens = mtmd.mtmd_input_chunk_get_tokens_text(chunk, ctypes.byref(count))
                ids += [tokens[i] for i in range(count.value)]
            else:
                ids += [image_token_id] * mtmd.mtmd_input_chunk_get_n_tokens(chunk)
        settings = llama_cpp.llama_context_default_params()
        settings.n_ctx = settings.n_batch = max(64, len(ids))
        settings.n_threads = settings.n_threads_batch = 1
        lctx = llama_cpp.llama_init_from_model(model, settings)
        past = llama_cpp.llama_pos(0)
        if mtmd.mtmd_helper_eval_chunks(context, lctx, chunks, 0, 0, settings.n_batch, True, ctypes.byref(past)):
            raise ConfigError("llama.cpp could not evaluate the prompt with its image")
        vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(model))
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(lctx, -1), shape=(vocab,)).copy()
    finally:
        mtmd.mtmd_input_chunks_free(chunks)
        mtmd.mtmd_bitmap_free(bitmap)
        mtmd.mtmd_free(context)
        if lctx is not None:
            llama_cpp.llama_free(lctx)
        llama_cpp.llama_model_free(model)
    return ids, logits
