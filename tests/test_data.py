import json

import pytest

from hydra_rank.config import DataConfig
from hydra_rank.data import EncodedDataset, easy_vqa, load_samples
from hydra_rank.data.encode import IGNORE_INDEX, ChatEncoder, collate
from hydra_rank.data.records import load_json_samples
from hydra_rank.data.sample import Sample, load_image
from hydra_rank.errors import DataError

from .conftest import TINY_IMAGE_SIZE, make_tiny_llava


@pytest.fixture(scope="module")
def processor(tokenizer):
    return make_tiny_llava(tokenizer)[1]


@pytest.fixture(scope="module")
def encoder(processor):
    return ChatEncoder(processor, system_prompt="Answer briefly.", max_length=128)


def test_easy_vqa_questions_and_answers():
    train, test = easy_vqa.questions("train"), easy_vqa.questions("test")
    assert (len(train), len(test)) == (38575, 9673)
    assert train[0].answer == "rectangle" and train[0].images[0].name == "0.png"
    counts = easy_vqa.answer_counts("train")
    assert len(counts) == 13 and sum(counts.values()) == len(train)


def test_easy_vqa_captions_agree_with_every_question():
    """Captions are derived from questions; each derived attribute must be consistent with all of that image's
    shape/colour answers, and most images must get both attributes."""
    attributes = easy_vqa.image_attributes("train")
    assert len(attributes) == 4000
    assert sum(len(a) == 2 for a in attributes.values()) / 4000 > 0.85
    for question, answer, image_id in easy_vqa._rows("train"):
        if answer in easy_vqa.SHAPES:
            assert attributes[image_id]["shape"] == answer, question
        if answer in easy_vqa.COLORS:
            assert attributes[image_id]["color"] == answer, question
    captions = easy_vqa.captions("train")
    assert len(captions) == 4000
    assert captions[0].answer == "A blue rectangle."


def test_eval_subset_is_fixed_across_training_seeds():
    config = DataConfig(train_samples=50, eval_samples=20)
    train0, eval0 = load_samples(config, seed=0)
    train1, eval1 = load_samples(config, seed=1)
    assert eval0 == eval1
    assert train0 != train1 and len(train0) == 50


def test_llava_json_and_jsonl_read_the_same_records(colour_dataset):
    train_path, eval_path = colour_dataset
    train, held_out = load_json_samples(train_path), load_json_samples(eval_path)
    assert len(train) == 12 and len(held_out) == 6
    assert train[:6] != held_out  # sources differ (file:line vs file[index]) ...
    assert [s.messages for s in train[:6]] == [s.messages for s in held_out]  # ... the content does not
    assert train[0].messages[0]["role"] == "user" and train[0].answer == "red"
    assert train[0].source.endswith("train.jsonl:1")


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", r"train.jsonl:2 is not valid JSON"),
        (json.dumps({"image": "../../etc/passwd", "conversations": []}), "outside the image folder"),
        (json.dumps({"image": "images/0.png", "conversations": [{"from": "gpt", "value": "x"}]}), "placeholder"),
        (json.dumps({"conversations": [{"from": "robot", "value": "x"}]}), "each turn needs 'from'"),
        (json.dumps({"conversations": [{"from": "human", "value": "hi"}]}), "must end with an assistant message"),
        (json.dumps([1, 2]), "expected an object with a 'conversations' or 'messages' list"),
    ],
)
def test_bad_llava_records_name_file_and_line(colour_dataset, line, message):
    train_path, _ = colour_dataset
    first = train_path.read_text().splitlines()[0]
    train_path.write_text(f"{first}\n{line}\n")
    with pytest.raises(DataError, match=message):
        load_json_samples(train_path)


def test_empty_and_missing_dataset_files(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(DataError, match="holds no samples"):
        load_json_samples(empty)
    with pytest.raises(DataError, match="does not exist"):
        load_json_samples(tmp_path / "missing.json")


def test_missing_and_corrupt_images_fail_on_encode(colour_dataset, encoder):
    train_path, _ = colour_dataset
    samples = load_json_samples(train_path)
    samples[0].images[0].unlink()
    with pytest.raises(DataError, match="does not exist"):
        encoder.encode(samples[0])
    samples[1].images[0].write_bytes(b"not a png")
    with pytest.raises(DataError, match="cannot be read as an image"):
        encoder.encode(samples[1])


def test_labels_cover_exactly_the_answer_and_end_of_turn(encoder, colour_dataset):
    sample = load_json_samples(colour_dataset[0])[2]
    item = encoder.encode(sample)
    tokenizer = encoder.tokenizer
    answer_ids = [t for t in item.labels if t != IGNORE_INDEX]
    assert tokenizer.decode(answer_ids) == "blue<|im_end|>"
    assert item.labels[: item.prompt_length] == [IGNORE_INDEX] * item.prompt_length
    assert item.labels[item.prompt_length :] == item.input_ids[item.prompt_length :]
    prompt = tokenizer.decode(item.input_ids[: item.prompt_length])
    assert prompt.startswith("<|im_start|>system\nAnswer briefly.<|im_end|>")
    assert prompt.endswith("<|im_start|>assistant\n")
    image_token = tokenizer.convert_tokens_to_ids("<image>")
    assert item.input_ids.count(image_token) == (TINY_IMAGE_SIZE // 14) ** 2
    assert item.vision["pixel_values"].shape == (1, 3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE)


def test_prompt_tokens_equal_what_generation_sees(encoder, colour_dataset):
    """Training tokenizes the prompt exactly as a generation prompt would be (template + processor)."""
    sample = load_json_samples(colour_dataset[0])[0]
    item = encoder.encode(sample)
    messages = [{"role": "system", "content": "Answer briefly."}, *sample.prompt_messages]
    text = encoder.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    expected = encoder.processor(text=text, images=[load_image(sample.images[0])], add_special_tokens=False)
    assert item.input_ids[: item.prompt_length] == expected["input_ids"][0]


def test_multi_turn_conversations_label_every_answer(encoder, colour_dataset):
    image = load_json_samples(colour_dataset[0])[0].images[0]
    sample = Sample(
        messages=(
            {"role": "user", "content": "<image>\nwhat color?"},
            {"role": "assistant", "content": "red"},
            {"role": "user", "content": "and the shape?"},
            {"role": "assistant", "content": "square"},
        ),
        images=(image,),
    )
    item = encoder.encode(sample)
    labelled = encoder.tokenizer.decode([t for t in item.labels if t != IGNORE_INDEX])
    assert labelled == "red<|im_end|>square<|im_end|>"
    assert encoder.tokenizer.decode(item.input_ids[item.prompt_length :]) == "square<|im_end|>"


def test_system_prompt_none_uses_the_templates_default(processor, colour_dataset):
    item = ChatEncoder(processor, system_prompt=None).encode(load_json_samples(colour_dataset[0])[0])
    assert "You are a helpful AI assistant named SmolLM" in processor.tokenizer.decode(item.input_ids)


def test_too_long_samples_are_rejected_not_truncated(processor, colour_dataset):
    with pytest.raises(DataError, match=r"more than data\.max_length=10"):
        ChatEncoder(processor, max_length=10).encode(load_json_samples(colour_dataset[0])[0])


def test_tokenizer_without_chat_template_is_rejected(tokenizer):
    bare = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    bare.chat_template = None
    with pytest.raises(DataError, match="no chat template"):
        ChatEncoder(bare)


def test_collate_pads_right_for_training_and_left_for_generation(encoder, colour_dataset):
    samples = load_json_samples(colour_dataset[0])[:3]
    longer = {"role": "user", "content": "<image>\nwhat is the colour of this shape, please?"}
    samples[1] = Sample(
        messages=(longer, samples[1].messages[-1]),
        images=samples[1].images,
    )
    items = list(EncodedDataset(samples, encoder))
    batch = collate(items, encoder.pad_token_id)
    lengths = [len(i.input_ids) for i in items]
    assert batch["input_ids"].shape == (3, max(lengths))
    assert batch["attention_mask"].sum(1).tolist() == lengths
    assert batch["attention_mask"][:, 0].all()  # right padding: every row starts with a real token
    assert batch["pixel_values"].shape[0] == 3
    assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE_INDEX).all()

    prompts = collate(items, encoder.pad_token_id, prompt_only=True)
    assert "labels" not in prompts
    assert prompts["attention_mask"][:, -1].all()  # left padding: every row ends at the last column
    assert prompts["attention_mask"].sum(1).tolist() == [i.prompt_length for i in items]
    first = items[0].input_ids[: items[0].prompt_length]
    assert prompts["input_ids"][0, -len(first) :].tolist() == first


def test_scenes_are_deterministic_and_answers_match_the_drawing(tmp_path):
    from hydra_rank.data import scenes

    first, second = tmp_path / "a", tmp_path / "b"
    counts = scenes.generate(first, seed=3)
    scenes.generate(second, seed=3)
    assert (first / "train.jsonl").read_text() == (second / "train.jsonl").read_text()
    assert (first / "images" / "test-00007.png").read_bytes() == (second / "images" / "test-00007.png").read_bytes()
    samples = load_json_samples(first / "train.jsonl")
    assert len(samples) == counts["train"] and counts["test"] > 1000
    kinds = {s.messages[0]["content"].split("\n")[1].split()[0] for s in samples}
    assert kinds == {"Describe", "How", "What", "Where", "Is"}
    describe = [s for s in samples if s.messages[0]["content"].endswith("Describe the image.")]
    assert max(len(s.answer.split()) for s in describe) >= 20  # long, structured answers exist
    # the drawing agrees with the answer: the quadrant named in "What is at ..." has (or lacks) coloured pixels
    for sample in samples[:200]:
        question = sample.messages[0]["content"]
        if "What is at the" not in question:
            continue
        position = scenes.POSITIONS.index(question.split("What is at the ")[1].rstrip("?"))
        image = load_image(sample.images[0])
        x, y = (position % 2) * scenes.CELL + scenes.CELL // 2, (position // 2) * scenes.CELL + scenes.CELL // 2
        centre = image.getpixel((x, y + 4))
        assert (centre != (255, 255, 255)) == (sample.answer != "nothing"), (question, sample.answer)


def test_text_tasks_are_correct_and_deterministic(tmp_path):
    from hydra_rank.data import text_tasks

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    text_tasks.write_task(tmp_path / "a", seed=5, train=200, test=20)
    text_tasks.write_task(tmp_path / "b", seed=5, train=200, test=20)
    assert (tmp_path / "a" / "train.jsonl").read_text() == (tmp_path / "b" / "train.jsonl").read_text()
    for sample in load_json_samples(tmp_path / "a" / "train.jsonl"):
        question, answer = sample.messages[0]["content"], sample.answer
        assert not sample.images
        argument = question.split(": ", 1)[1]
        if question.startswith("Add"):
            left, right = argument.split(" + ")
            assert int(answer) == int(left) + int(right)
        elif question.startswith("Reverse"):
            assert answer == argument[::-1]
        elif question.startswith("Sort"):
            assert answer == "".join(sorted(argument))
        else:
            assert answer.replace("-", "") == argument[::-1]


def _llava_record(index: int, colour: str) -> dict:
    return {
        "image": f"images/{index}.png",
        "conversations": [
            {"from": "human", "value": "<image>\nwhat color is the shape?"},
            {"from": "gpt", "value": colour},
        ],
    }


def test_messages_and_sharegpt_records_read_as_the_llava_record(colour_dataset, tmp_path):
    root = colour_dataset[0].parent
    question = "what color is the shape?"
    shapes = {
        "llava": _llava_record(0, "red"),
        "sharegpt with images and system": {
            "system": "Answer briefly.",
            "images": ["images/0.png"],
            "conversations": [{"from": "human", "value": f"<image>\n{question}"}, {"from": "gpt", "value": "red"}],
        },
        "messages with placeholders": {
            "messages": [
                {"role": "system", "content": "Answer briefly."},
                {"role": "user", "content": f"<image>\n{question}"},
                {"role": "assistant", "content": "red"},
            ],
            "images": ["images/0.png"],
        },
        "messages with content parts": {
            "messages": [
                {"role": "system", "content": [{"type": "text", "text": "Answer briefly."}]},
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": f"\n{question}"}]},
                {"role": "assistant", "content": [{"type": "text", "text": "red"}]},
            ],
            "images": ["images/0.png"],
        },
    }
    path = root / "mixed.jsonl"
    path.write_text("".join(json.dumps(record) + "\n" for record in shapes.values()))
    samples = load_json_samples(path)
    llava = samples[0]
    for name, sample in zip(list(shapes)[1:], samples[1:], strict=True):
        assert sample.images == llava.images, name
        assert sample.messages[-2:] == llava.messages, name
        assert sample.messages[0] == {"role": "system", "content": "Answer briefly."}, name


def test_multi_image_multi_turn_sample_encodes_every_image_and_answer(encoder, colour_dataset):
    record = {
        "messages": [
            {"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "same?"}]},
            {"role": "assistant", "content": "no"},
            {"role": "user", "content": "what color is the first one?"},
            {"role": "assistant", "content": "red"},
        ],
        "images": ["images/0.png", "images/1.png"],
    }
    path = colour_dataset[0].parent / "two.json"
    path.write_text(json.dumps([record]))
    (sample,) = load_json_samples(path)
    item = encoder.encode(sample)
    image_token = encoder.tokenizer.convert_tokens_to_ids("<image>")
    assert item.vision["pixel_values"].shape[0] == 2
    per_image = encoder.encode(load_json_samples(colour_dataset[0])[0]).input_ids.count(image_token)
    assert per_image > 0 and item.input_ids.count(image_token) == 2 * per_image
    labelled = encoder.tokenizer.decode([t for t in item.labels if t != IGNORE_INDEX])
    assert labelled == "no<|im_end|>red<|im_end|>"


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ({"messages": [{"role": "user", "content": [{"type": "video"}]}]}, "content parts must be"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "each message needs 'role'"),
        ({"messages": [{"role": "user", "content": "<image> hi"}, {"role": "assistant", "content": "a"}]},
         "1 <image> placeholder"),
        ({"question": "x"}, "'conversations' or 'messages'"),
    ],
)  # fmt: skip
def test_bad_records_name_the_line_and_the_fix(colour_dataset, record, message):
    path = colour_dataset[0].parent / "bad.jsonl"
    path.write_text(json.dumps(_llava_record(0, "red")) + "\n" + json.dumps(record) + "\n")
    with pytest.raises(DataError, match=message) as error:
        load_json_samples(path)
    assert "bad.jsonl:2" in str(error.value)


def test_hf_datasets_folders_with_embedded_images_and_splits(colour_dataset, tmp_path):
    datasets = pytest.importorskip("datasets")  # a dev dependency: `make test` installs it
    root = colour_dataset[0].parent
    records = [json.loads(line) for line in colour_dataset[0].read_text().splitlines()]
    rows = {
        "images": [[load_image(root / r["image"])] for r in records],
        "messages": [
            [{"role": "user", "content": "<image>\nwhat color is the shape?"},
             {"role": "assistant", "content": r["conversations"][-1]["value"]}]
            for r in records
        ],
    }  # fmt: skip
    data = datasets.Dataset.from_dict(rows, features=datasets.Features({
        "images": datasets.Sequence(datasets.Image()),
        "messages": [{"role": datasets.Value("string"), "content": datasets.Value("string")}],
    }))  # fmt: skip
    datasets.DatasetDict({"train": data, "test": data.select(range(4))}).save_to_disk(str(tmp_path / "dd"))
    train, held_out = load_samples(DataConfig(dataset="hf-dataset", train_path=str(tmp_path / "dd")), seed=0)
    assert len(train) == 12 and len(held_out) == 4
    from_json = {s.answer: load_image(s.images[0]) for s in load_json_samples(colour_dataset[0])}
    for sample in train:
        assert list(load_image(sample.images[0]).getdata()) == list(from_json[sample.answer].getdata())
    data.save_to_disk(str(tmp_path / "flat"))
    with pytest.raises(DataError, match="not a folder written by datasets"):
        load_samples(DataConfig(dataset="hf-dataset", train_path=str(tmp_path)), seed=0)
    datasets.DatasetDict({"train": data}).save_to_disk(str(tmp_path / "trainonly"))
    with pytest.raises(DataError, match=r"the eval data needs one of \['test', 'validation'\]"):
        load_samples(DataConfig(dataset="hf-dataset", train_path=str(tmp_path / "trainonly")), seed=0)
    flat, _ = load_samples(DataConfig(dataset="hf-dataset", train_path=str(tmp_path / "flat"),
                                      eval_path=str(tmp_path / "flat")), seed=0)  # fmt: skip
    assert len(flat) == 12
    for arrow in (tmp_path / "flat").glob("*.arrow"):
        arrow.write_bytes(b"not arrow")  # a damaged save: one clear error, not the reader's traceback
    with pytest.raises(DataError, match="cannot be read by datasets' load_from_disk"):
        load_samples(DataConfig(dataset="hf-dataset", train_path=str(tmp_path / "flat")), seed=0)
