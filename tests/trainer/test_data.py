"""Tokenization and collation: completion-only masks are exact, packing keeps examples apart."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from loraflow_trainer import data
from loraflow_trainer.data import IGNORE_INDEX
from loraflow_trainer.errors import DataError


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    return AutoTokenizer.from_pretrained(tiny_model)


def test_prompt_completion_loss_only_on_completion(make_job, tokenizer):
    job_path, job = make_job(rows=[{"prompt": "What is 2 plus 3?", "completion": " 2 plus 3 is 5."}])
    [ex] = data.load_examples(job, job_path.parent / "train.jsonl", tokenizer)
    prompt = [tokenizer.bos_token_id] + tokenizer("What is 2 plus 3?", add_special_tokens=False)["input_ids"]
    completion = tokenizer(" 2 plus 3 is 5.", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert ex["input_ids"] == prompt + completion
    assert ex["labels"] == [IGNORE_INDEX] * len(prompt) + completion


def test_loss_on_all_keeps_every_label(make_job, tokenizer):
    job_path, job = make_job(rows=[{"prompt": "a b", "completion": " c"}], training={"loss_on": "all"})
    [ex] = data.load_examples(job, job_path.parent / "train.jsonl", tokenizer)
    assert ex["labels"] == ex["input_ids"]


CHAT = [
    {"role": "system", "content": "Be short."},
    {"role": "user", "content": "What is 1 plus 1?"},
    {"role": "assistant", "content": "2."},
    {"role": "user", "content": "And 2 plus 2?"},
    {"role": "assistant", "content": "4."},
]


def _assistant_spans(tokenizer, ids, labels):
    learned = [t for t, lab in zip(ids, labels, strict=True) if lab != IGNORE_INDEX]
    return tokenizer.decode(learned)


def test_chat_loss_only_on_assistant_turns(make_job, tokenizer):
    job_path, job = make_job(rows=[{"messages": CHAT}], eval_rows=[{"messages": CHAT}], data_format="chat")
    [ex] = data.load_examples(job, job_path.parent / "train.jsonl", tokenizer)
    assert _assistant_spans(tokenizer, ex["input_ids"], ex["labels"]) == "2.<|end|>4.<|end|>"
    # Every masked-in position holds its own token id.
    assert all(lab in (IGNORE_INDEX, t) for t, lab in zip(ex["input_ids"], ex["labels"], strict=True))


def test_chat_mask_without_generation_markers_matches(make_job, tokenizer, tiny_model):
    job_path, job = make_job(rows=[{"messages": CHAT}], eval_rows=[{"messages": CHAT}], data_format="chat")
    [marked] = data.load_examples(job, job_path.parent / "train.jsonl", tokenizer)
    plain = AutoTokenizer.from_pretrained(tiny_model)
    plain.chat_template = plain.chat_template.replace("{% generation %}", "").replace("{% endgeneration %}", "")
    [derived] = data.load_examples(job, job_path.parent / "train.jsonl", plain)
    assert derived == marked


def test_chat_row_without_assistant_turn_is_a_data_error(make_job, tokenizer):
    job_path, job = make_job(
        rows=[{"messages": [{"role": "user", "content": "hi"}]}], data_format="chat", eval_rows=[{"messages": CHAT}]
    )
    with pytest.raises(DataError, match="no assistant turn"):
        data.load_examples(job, job_path.parent / "train.jsonl", tokenizer)


def test_missing_column_names_the_columns(make_job, tokenizer):
    job_path, job = make_job(rows=[{"question": "a", "answer": "b"}])
    with pytest.raises(DataError, match="lacks column"):
        data.load_examples(job, job_path.parent / "train.jsonl", tokenizer)


def test_packing_keeps_examples_apart(tiny_model, tokenizer):
    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    a = {"input_ids": tokenizer("What is 3 plus 4? 3 plus 4 is 7.")["input_ids"]}
    b = {"input_ids": tokenizer("Paint the sky blue.")["input_ids"]}
    assert a["input_ids"][0] == b["input_ids"][0] == tokenizer.bos_token_id
    for ex in (a, b):
        ex["labels"] = list(ex["input_ids"])
    batch = data.PackingCollator()([a, b])
    assert "attention_mask" not in batch
    with torch.no_grad():
        packed = model(**{k: v for k, v in batch.items() if k != "labels"}).logits[0]
        alone_a = model(input_ids=torch.tensor([a["input_ids"]])).logits[0]
        alone_b = model(input_ids=torch.tensor([b["input_ids"]])).logits[0]
    n = len(a["input_ids"])
    torch.testing.assert_close(packed[:n], alone_a, atol=1e-5, rtol=1e-4)
    # b attends only to itself: identical to running it alone, despite following a.
    torch.testing.assert_close(packed[n:], alone_b, atol=1e-5, rtol=1e-4)
    # No example learns to predict its first token from the one before it.
    assert batch["labels"][0, n].item() == IGNORE_INDEX
    assert batch["position_ids"][0].tolist() == list(range(n)) + list(range(len(b["input_ids"])))


def test_padding_collator_pads_right_and_masks_labels(tokenizer):
    feats = [{"input_ids": [1, 2, 3], "labels": [1, 2, 3]}, {"input_ids": [1, 2], "labels": [-100, 2]}]
    batch = data.PaddingCollator(tokenizer.pad_token_id)(feats)
    assert batch["input_ids"].tolist() == [[1, 2, 3], [1, 2, tokenizer.pad_token_id]]
    assert batch["labels"].tolist() == [[1, 2, 3], [-100, 2, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]


def test_empty_dataset_is_a_data_error(make_job, tokenizer):
    job_path, job = make_job()
    (job_path.parent / "train.jsonl").write_text("")
    with pytest.raises(DataError, match="no rows|cannot be read"):
        data.load_examples(job, job_path.parent / "train.jsonl", tokenizer)


def test_null_cell_is_a_data_error_naming_the_row(make_job, tokenizer):
    rows = [{"prompt": "a", "completion": " b"}, {"prompt": None, "completion": " c"}]
    job_path, job = make_job(rows=rows)
    with pytest.raises(DataError, match=r"row 1: column 'prompt'"):
        data.load_examples(job, job_path.parent / "train.jsonl", tokenizer)


def test_csv_numbers_stay_text(make_job, tokenizer):
    job_path, job = make_job()
    (job_path.parent / "train.csv").write_text("prompt,completion\n12,34\n")
    [ex] = data.load_examples(job, job_path.parent / "train.csv", tokenizer)
    assert tokenizer.decode(ex["input_ids"], skip_special_tokens=True) == "1234"


def test_sample_prompts_start_like_training_examples(make_job, tokenizer):
    job_path, job = make_job(rows=[{"prompt": "What is 2 plus 3?", "completion": " 5."}])
    [ex] = data.load_examples(job, job_path.parent / "train.jsonl", tokenizer)
    [ids] = data.encode_prompts(job, ["What is 2 plus 3?"], tokenizer)
    assert ex["input_ids"][: len(ids)] == ids and ex["labels"][len(ids)] != IGNORE_INDEX
    chat_path, chat_job = make_job(rows=[{"messages": CHAT}], eval_rows=[{"messages": CHAT}], data_format="chat")
    [prompt] = data.prompts_for_samples(chat_job, chat_path.parent / "train.jsonl", tokenizer, 1)
    [chat_ids] = data.encode_prompts(chat_job, [prompt], tokenizer)
    [chat_ex] = data.load_examples(chat_job, chat_path.parent / "train.jsonl", tokenizer)
    # The prompt is the conversation up to the first assistant turn, BOS included once.
    assert chat_ex["input_ids"][: len(chat_ids)] == chat_ids and chat_ids.count(tokenizer.bos_token_id) == 1
