"""On-device formats for an exported run, made with llama.cpp's own tools: the merged language model as GGUF
(f16, q8_0, q4_k_m), plus the vision half where the model has one: llama.cpp's `mmproj` GGUF for the vision towers
its multimodal runtime (mtmd) supports, else the vision tower + projector as ONNX.

Where the tools come from. llama.cpp's converter (`convert_hf_to_gguf.py`, its `conversion/` package and the `gguf-py`
it was written against) is not in any wheel: it ships inside the llama-cpp-python source distribution on PyPI, which
we download once at a pinned version and checksum, and unpack into the cache. The converter writes f16 and q8_0
itself (q8_0 is quantized in numpy). The k-quants (q4_k_m) need llama.cpp's C quantizer, reached through the
compiled llama-cpp-python binding (`llama_model_quantize`): `make deploy-tools` builds it (compiling llama.cpp takes
15-30 minutes on 2 cores, so `make install` does not). Nothing here writes GGUF by hand.
"""

from __future__ import annotations

import ctypes
import json
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import torch
from torch import nn

from .cache import cached, sha256
from .errors import ConfigError
from .utils import one_line

LLAMA_CPP_PYTHON = "0.3.36"  # its vendored llama.cpp is ggml-org/llama.cpp@0c1e57098
LLAMA_CPP_SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
CONVERTER_PARTS = ("convert_hf_to_gguf.py", "convert_lora_to_gguf.py", "conversion", "gguf-py")
CONVERTER = "convert_hf_to_gguf.py"
QUANTS = ("f16", "q8_0", "q4_k_m")
C_QUANTS = {"q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M"}  # quantized by llama.cpp's C code from the f16 file
# model_type (config.json) of the VLMs whose vision tower llama.cpp's converter writes as an mmproj file
MMPROJ_TYPES = frozenset({"gemma3", "idefics3", "smolvlm", "qwen2_vl", "qwen2_5_vl"})


def _unpack_converter(staging: Path) -> None:
    """Download the pinned llama-cpp-python sdist (pip, from the package index) and keep only the converter."""
    with tempfile.TemporaryDirectory() as download:
        command = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:"]
        done = subprocess.run(
            [*command, "-d", download, f"llama-cpp-python=={LLAMA_CPP_PYTHON}"], capture_output=True, text=True
        )
        archives = list(Path(download).glob("llama_cpp_python-*.tar.gz"))
        if done.returncode or not archives:
            raise ConfigError(
                f"cannot download llama-cpp-python {LLAMA_CPP_PYTHON} (the source of llama.cpp's GGUF converter) "
                f"from the package index: {one_line(done.stderr or 'no archive', 300)}"
            )
        if sha256(archives[0]) != LLAMA_CPP_SDIST_SHA256:
            raise ConfigError(f"{archives[0].name} does not have the pinned sha256 {LLAMA_CPP_SDIST_SHA256}")
        root = f"llama_cpp_python-{LLAMA_CPP_PYTHON}/vendor/llama.cpp/"
        with tarfile.open(archives[0]) as archive:
            members = [m for m in archive.getmembers() if m.name.removeprefix(root).split("/")[0] in CONVERTER_PARTS]
            for member in members:
                member.name = member.name.removeprefix(root)
            archive.extractall(staging, members=members, filter="data")


def converter_dir() -> Path:
    """llama.cpp's converter at the pinned version, unpacked into the cache on first use."""
    inputs = {"llama-cpp-python": LLAMA_CPP_PYTHON, "sha256": LLAMA_CPP_SDIST_SHA256, "parts": CONVERTER_PARTS}
    return cached("llama-cpp-converter", inputs, _unpack_converter, marker=CONVERTER)


def convert(model_dir: Path, output: Path, outtype: str, mmproj: bool = False) -> Path:
    """Run llama.cpp's converter on a Hugging Face model folder; its own error, in one line, if it refuses."""
    command = [sys.executable, str(converter_dir() / CONVERTER), str(model_dir), "--outtype", outtype]
    done = subprocess.run(
        [*command, "--outfile", str(output), *(["--mmproj"] if mmproj else [])], capture_output=True, text=True
    )
    if done.returncode or not output.is_file():
        lines = [line for line in done.stderr.splitlines() if "ERROR" in line or "Error" in line] or [done.stderr]
        kind = "the vision tower (mmproj) of " if mmproj else ""
        raise ConfigError(
            f"llama.cpp's converter (llama-cpp-python {LLAMA_CPP_PYTHON}) cannot convert {kind}{model_dir}: "
            f"{one_line(lines[-1], 300)}"
        )
    return output


def quantize(f16: Path, output: Path, quant: str) -> Path:
    """Quantize a GGUF file with llama.cpp's C quantizer (through llama-cpp-python)."""
    try:
        import llama_cpp
    except ImportError as error:
        raise ConfigError(
            f"--quant {quant} needs llama.cpp's quantizer from the compiled llama-cpp-python package, which is not "
            f"installed ({error}); run `make deploy-tools` (compiles llama.cpp once), or use --quant f16 or q8_0"
        ) from None
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, C_QUANTS[quant])
    if llama_cpp.llama_model_quantize(str(f16).encode(), str(output).encode(), ctypes.byref(params)) != 0:
        raise ConfigError(f"llama.cpp could not quantize {f16} to {quant}")
    return output


def check_quant(quant: str) -> None:
    if quant not in QUANTS:
        raise ConfigError(f"--quant {quant} is not supported; choose one of {', '.join(QUANTS)}")


def to_gguf(model_dir: Path, output_dir: Path, quant: str, mmproj: bool) -> dict[str, Path]:
    """The language model of the merged model in `model_dir` as `model-QUANT.gguf`, and with `mmproj` its vision
    half as `mmproj-f16.gguf` (for towers llama.cpp runs: `vision_kind`). Returns the files written."""
    check_quant(quant)
    output_dir.mkdir(parents=True, exist_ok=True)
    model = output_dir / f"model-{quant}.gguf"
    if quant in C_QUANTS:
        with tempfile.TemporaryDirectory(dir=output_dir) as scratch:
            quantize(convert(model_dir, Path(scratch) / "model-f16.gguf", "f16"), model, quant)
    else:
        convert(model_dir, model, quant)
    written = {"gguf": model}
    if mmproj:
        written["mmproj"] = convert(model_dir, output_dir / "mmproj-f16.gguf", "f16", mmproj=True)
    return written


def vision_kind(model_dir: Path) -> str | None:
    """How the vision half is deployed: `mmproj` (llama.cpp's runtime), `onnx` (any other vision tower) or None
    (a text-only model)."""
    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    if "vision_config" not in config:
        return None
    return "mmproj" if config.get("model_type") in MMPROJ_TYPES else "onnx"


class VisionHalf(nn.Module):
    """pixel_values -> the image embeddings the language model reads (vision tower, feature selection, projector),
    through the family's own `get_image_features`."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        features = self.model.model.get_image_features(pixel_values=pixel_values)
        features = getattr(features, "pooler_output", features)
        return torch.stack(list(features)) if isinstance(features, list | tuple) else features


@torch.no_grad()
def vision_to_onnx(model: nn.Module, pixel_values: torch.Tensor, output: Path) -> float:
    """Export the vision half for one image at a time (what an on-device pipeline feeds it) with torch's ONNX
    exporter, run it in onnxruntime and return the largest difference from PyTorch's image embeddings."""
    import onnxruntime

    half = VisionHalf(model).eval()
    image = pixel_values[:1].float()
    expected = half(image)
    output.parent.mkdir(parents=True, exist_ok=True)
    torch.onnx.export(
        half, (image,), str(output), input_names=["pixel_values"], output_names=["image_embeddings"], dynamo=False
    )
    session = onnxruntime.InferenceSession(str(output), providers=["CPUExecutionProvider"])
    [actual] = session.run(None, {"pixel_values": image.numpy()})
    return float((torch.from_numpy(actual) - expected).abs().max())
