"""Adapter training: LoRA, IA3 and prefix tuning on a tiny random Llama; one integration run on SmolLM2."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from tad_core.adapter_dir import MANIFEST
from tad_core.assets import sha256_file
from tad_core.formats import gold_continuation
from tad_core.models import load_pair, load_tokenizer
from tad_core.samples import Sample
from tad_core.train import (
    TrainConfig,
    _collate,
    _encode,
    _target_loss,
    select_samples,
    train_adapter,
)

ROWS = [
    {"id": "c0", "prompt": "Question: What colour is the sky?\nAnswer:", "choices": ["blue", "green"], "answer": 0},
    {"id": "c1", "prompt": "Question: What colour is grass?\nAnswer:", "choices": ["red", "green"], "answer": 1},
    {"id": "c2", "prompt": "Question: What colour is snow?\nAnswer:", "choices": ["white", "black", "blue"], "answer": 0},
    {"id": "w0", "choice_prompts": ["Ann beat Bo so Ann", "Ann beat Bo so Bo"], "continuation": "was sad.", "answer": 1},
]


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("train_data") / "tiny.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return path


def config(tmp_path: Path, base: Path, data: Path, method: str, **kw) -> TrainConfig:
    args = dict(out=tmp_path / method, base=str(base), dataset=str(data), method=method, steps=5, train_size=4,
                batch_size=2, seed=0, max_length=64)
    args.update(kw)
    return TrainConfig(**args)


def test_gold_continuation_targets():
    mc, _, _, wino = (Sample.from_dict(r) for r in ROWS)
    assert gold_continuation(mc) == ("Question: What colour is the sky?\nAnswer:", " blue")
    assert gold_continuation(wino) == ("Ann beat Bo so Bo", " was sad.")
    assert gold_continuation(Sample(id="g", prompt="2+2=", reference="4")) == ("2+2=", " 4")


def test_encode_masks_context_and_truncates_from_left(tiny_model_dir: Path):
    tok = load_tokenizer(tiny_model_dir)
    ids, labels = _encode(tok, "Question: What colour is the sky?\nAnswer:", " blue", 64)
    target = [t for t in labels if t != -100]
    assert tok.decode(target) == " blue" and labels[: len(ids) - len(target)] == [-100] * (len(ids) - len(target))
    short_ids, short_labels = _encode(tok, "word " * 50, " blue", 8)
    assert len(short_ids) == 8 and tok.decode([t for t in short_labels if t != -100]) == " blue"


def test_select_samples_is_seeded():
    samples = [Sample(id=str(i), prompt="p", choices=("a", "b"), answer=0) for i in range(50)]
    assert select_samples(samples, 10, 0) == select_samples(samples, 10, 0)
    assert select_samples(samples, 10, 0) != select_samples(samples, 10, 1)
    assert len(select_samples(samples, 100, 0)) == 50


def test_config_validation(tmp_path: Path):
    with pytest.raises(ValueError, match="method: unknown training method 'qlora'"):
        TrainConfig(out=tmp_path, method="qlora")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="steps: must be a positive integer"):
        TrainConfig(out=tmp_path, steps=0)
    for lr in (-1.0, float("inf"), float("nan")):  # inf trained an adapter of NaN weights
        with pytest.raises(ValueError, match="lr: must be a positive finite number"):
            TrainConfig(out=tmp_path, lr=lr)
    with pytest.raises(ValueError, match="seed: must be an integer in"):
        TrainConfig(out=tmp_path, seed=2**70)
    assert TrainConfig(out=tmp_path, method="ia3").learning_rate == 3e-3
    assert TrainConfig(out=tmp_path, method="ia3", lr=0.1).learning_rate == 0.1


# IA3 accepts `adapter_names` but ignores it in current peft, so load_pair's probe falls back to two passes.
@pytest.mark.parametrize("method,peft_type,path", [("lora", "LORA", "mixed"), ("ia3", "IA3", "two_pass"),
                                                    ("prefix", "PREFIX_TUNING", "two_pass")])
def test_train_saves_loadable_adapter(tmp_path: Path, tiny_model_dir: Path, tiny_data: Path, method: str,
                                      peft_type: str, path: str):
    cfg = config(tmp_path, tiny_model_dir, tiny_data, method)
    manifest = train_adapter(cfg, progress=False)
    weights = cfg.out / "adapter_model.safetensors"
    assert weights.exists() and (cfg.out / "adapter_config.json").exists()
    on_disk = json.loads((cfg.out / MANIFEST).read_text())
    assert on_disk == manifest
    assert manifest["adapter_sha256"] == sha256_file(weights)
    assert manifest["method"] == method and manifest["steps"] == 5 and len(manifest["losses"]) == 5
    assert manifest["train_size"] == 4 and manifest["dataset"] == "tiny" and manifest["seed"] == 0
    assert manifest["final_loss"] == manifest["losses"][-1]
    pair = load_pair(str(tiny_model_dir), adapter=cfg.out)
    assert pair.peft_type == peft_type and pair.path == path
    ids = pair.tokenizer("Question: What colour is the sky?\nAnswer:", return_tensors="pt")
    with torch.no_grad():
        tuned = pair.model(**ids).logits[0, -1]
        with pair.model.disable_adapter():
            base = pair.model(**ids).logits[0, -1]
    assert not torch.allclose(tuned, base)  # the trained adapter changes the model


def full_set_loss(model, tok, samples: list[Sample]) -> float:
    """Mean target loss over the whole tiny set in one batch (deterministic, unlike per-step losses)."""
    batch = _collate([_encode(tok, *gold_continuation(s), 64) for s in samples], tok.pad_token_id)
    with torch.no_grad():
        return float(_target_loss(model, batch))


@pytest.mark.parametrize("method,lr", [("lora", 1e-2), ("ia3", 3e-1), ("prefix", 1e-1)])
def test_loss_decreases(tmp_path: Path, tiny_model_dir: Path, tiny_data: Path, method: str, lr: float):
    cfg = config(tmp_path, tiny_model_dir, tiny_data, method, steps=20, lr=lr)
    manifest = train_adapter(cfg, progress=False)
    losses = manifest["losses"]
    assert manifest["mean_loss_last_10"] < sum(losses[:10]) / 10, losses
    pair = load_pair(str(tiny_model_dir), adapter=cfg.out)
    samples = [Sample.from_dict(r) for r in ROWS]
    tuned = full_set_loss(pair.model, pair.tokenizer, samples)
    with pair.model.disable_adapter():
        base = full_set_loss(pair.model, pair.tokenizer, samples)
    assert tuned < base - 0.1, (tuned, base)


def test_same_seed_same_adapter(tmp_path: Path, tiny_model_dir: Path, tiny_data: Path):
    a = train_adapter(config(tmp_path / "a", tiny_model_dir, tiny_data, "lora"), progress=False)
    b = train_adapter(config(tmp_path / "b", tiny_model_dir, tiny_data, "lora"), progress=False)
    c = train_adapter(config(tmp_path / "c", tiny_model_dir, tiny_data, "lora", seed=1), progress=False)
    assert a["adapter_sha256"] == b["adapter_sha256"] and a["losses"] == b["losses"]
    assert c["adapter_sha256"] != a["adapter_sha256"]


def test_cli_train_errors(tmp_path: Path, tiny_data: Path):
    from services.cli.main import app

    runner = CliRunner()
    result = runner.invoke(app, ["train", "--method", "qlora", "--out", str(tmp_path / "x")])
    assert result.exit_code == 2 and "method: unknown training method 'qlora'" in result.output
    result = runner.invoke(app, ["train", "--dataset", "nope", "--out", str(tmp_path / "x")])
    assert result.exit_code == 2 and "unknown dataset 'nope'" in result.output
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a", "prompt": "q", "choices": ["x"], "answer": 0}\n')
    result = runner.invoke(app, ["train", "--dataset", str(bad), "--out", str(tmp_path / "x")])
    assert result.exit_code == 2 and "line 1: field 'choices': needs at least 2 entries" in result.output
    assert "Traceback" not in result.output


def test_cli_train_runs(tmp_path: Path, tiny_model_dir: Path, tiny_data: Path):
    from services.cli.main import app

    out = tmp_path / "cli"
    result = CliRunner().invoke(app, ["train", "--base", str(tiny_model_dir), "--dataset", str(tiny_data),
                                      "--method", "lora", "--steps", "2", "--train-size", "4", "--batch-size", "2",
                                      "--no-progress", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "final loss" in result.output and (out / MANIFEST).exists()


def test_cli_train_names_and_shuffles_a_dataset_file_as_run_does(tmp_path: Path, tiny_model_dir: Path,
                                                                 tiny_data: Path):
    """`--dataset-name` and `--shuffle-choices` label the training data in the manifest as `tad run` labels an
    evaluation (NAME+shuffleSEED, the shuffled samples' hash); the shuffle changes what is trained on."""
    from services.cli.main import app

    def train(out: str, *extra: str) -> dict:
        result = CliRunner().invoke(app, ["train", "--base", str(tiny_model_dir), "--dataset", str(tiny_data),
                                          "--steps", "1", "--train-size", "4", "--batch-size", "2", "--no-progress",
                                          "--out", str(tmp_path / out), *extra])
        assert result.exit_code == 0, result.output
        return json.loads((tmp_path / out / MANIFEST).read_text())

    plain = train("plain", "--dataset-name", "colours")
    shuffled = train("shuffled", "--dataset-name", "colours", "--shuffle-choices", "3")
    assert plain["dataset"] == "colours" and shuffled["dataset"] == "colours+shuffle3"
    assert plain["mixture"][0]["content_hash"] != shuffled["mixture"][0]["content_hash"]
    bad = CliRunner().invoke(app, ["train", "--datasets", f"{tiny_data},arc_easy", "--dataset-name", "x",
                                   "--out", str(tmp_path / "bad")])
    assert bad.exit_code == 2 and "dataset_name: labels one dataset file" in bad.output


@pytest.mark.integration
def test_lora_on_smollm2(tmp_path: Path):
    cfg = TrainConfig(out=tmp_path / "lora", dataset="arc_easy", method="lora", steps=3, train_size=16,
                      batch_size=4, seed=0)
    manifest = train_adapter(cfg, progress=False)
    assert manifest["base"] == "smollm2-135m-instruct" and manifest["dataset"] == "arc_easy"
    assert manifest["base_fingerprint"].get("gguf_sha256")
    pair = load_pair("smollm2-135m-instruct", adapter=cfg.out)
    assert pair.peft_type == "LORA" and pair.path == "mixed"  # one batch holds base and fine-tuned rows


def test_multi_task_llm_adapters_training_records_the_mixture(tmp_path: Path, tiny_model_dir: Path):
    """One adapter from two registered sets rendered as instructions: the manifest names the mixture, sizes per
    set and the format; the training rows are the instruction prompts with 'the correct answer is ...' targets."""
    cfg = TrainConfig(out=tmp_path / "mix", base=str(tiny_model_dir), datasets=("piqa", "boolq"), method="lora",
                      steps=2, train_size=3, batch_size=2, seed=0, max_length=64, format="llm-adapters")
    manifest = train_adapter(cfg, progress=False)
    assert manifest["format"] == "llm-adapters@1" and manifest["loss"] == "response"
    assert [(m["dataset"], m["train_size"]) for m in manifest["mixture"]] == [("piqa", 3), ("boolq", 3)]
    assert manifest["dataset"] == "piqa+boolq" and manifest["train_size"] == 6


def test_loss_all_labels_the_context_too(tiny_model_dir: Path):
    tok = load_tokenizer(tiny_model_dir)
    ids, labels = _encode(tok, "Question: sky?\nAnswer:", " blue", 64, loss="all")
    assert labels == ids
    with pytest.raises(ValueError, match="loss: must be 'response' or 'all'"):
        TrainConfig(out=Path("x"), loss="some")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="format: unknown format"):
        TrainConfig(out=Path("x"), format="nope")
