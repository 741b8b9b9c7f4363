"""parity_kit.builtins.train: the recipe's pieces and a few end-to-end steps into tmp_path."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from parity_kit import models
from parity_kit.builtins import train
from parity_kit.builtins.corpus import BOS_ID
from parity_kit.errors import ParityKitError


def test_schedule_warms_up_then_decays_to_the_floor():
    s = train.TrainSettings(steps=100, lr=1e-2, warmup_steps=10, min_lr_ratio=0.1)
    lrs = [train.lr_at(i, s) for i in range(100)]
    assert lrs[9] == pytest.approx(1e-2)
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:10]))
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lrs[-1] == pytest.approx(1e-3)


def test_packed_batches_start_at_a_document_and_are_deterministic():
    tok = train.build_tokenizer(0)
    a = next(train.packed_batches(tok, 0, 4, 256))
    b = next(train.packed_batches(tok, 0, 4, 256))
    c = next(train.packed_batches(tok, 1, 4, 256))
    assert a.shape == (4, 257)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert (a[:, 0] == BOS_ID).all()
    assert int((a == BOS_ID).sum()) > 2 * len(a)  # rows pack several BOS-started documents (~77 tokens each)
    # a row is the token stream of whole documents, each after its own BOS
    docs = tok.decode(a[0].tolist(), skip_special_tokens=False).split("<s>")[1:]
    assert docs[0] and all(d for d in docs[:-1])


def test_bos_only_at_sequence_start_separates_documents_with_eos():
    tok = train.build_tokenizer(0)
    per_document = next(train.packed_batches(tok, 0, 4, 256))
    per_sequence = next(train.packed_batches(tok, 0, 4, 256, bos="sequence"))
    assert (per_sequence[:, 0] == BOS_ID).all() and int((per_sequence == BOS_ID).sum()) == len(per_sequence)
    assert int((per_sequence == train.EOS_ID).sum()) > len(per_sequence)  # several documents per row
    # the same documents in the same order: only the separators differ
    first = per_document[0].clone()
    first[1:][first[1:] == BOS_ID] = train.EOS_ID
    assert torch.equal(first, per_sequence[0])
    with pytest.raises(ParityKitError, match="bos="):
        next(train.packed_batches(tok, 0, 4, 256, bos="none"))


def test_model_init_is_deterministic_from_the_seed():
    def weights(seed):
        torch.manual_seed(seed)
        return train.build_model("tiny-internlm2", 64).state_dict()

    a, b, c = weights(0), weights(0), weights(1)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_train_internlm2_end_to_end(tmp_path):
    out = tmp_path / "tiny-internlm2"
    folder = train.train("tiny-internlm2", steps=3, out_dir=out, eval_limit=6, progress=False)
    assert folder == out
    record = json.loads((out / "training.json").read_text())
    assert record["settings"]["steps"] == 3 and len(record["loss_curve"]) == 3
    assert record["eval"]["with_bos"]["n"] == 6 and len(record["eval"]["with_bos"]["correct"]) == 6
    assert record["n_params"] == sum(t.numel() for t in load_file(out / "model.safetensors").values())
    assert (out / "loss.png").stat().st_size > 1000
    assert {t.dtype for t in load_file(out / "model.safetensors").values()} == {torch.float32}

    llama = tmp_path / "tiny-internlm2-llama"
    assert json.loads((llama / "training.json").read_text())["converted_from"] == "tiny-internlm2"
    m1, tok1 = models.load(out)
    m2, tok2 = models.load(llama)
    assert type(m2).__name__ == "LlamaForCausalLM"
    ids = tok1("User: who are you\nAssistant:", return_tensors="pt").input_ids
    assert torch.equal(ids, tok2("User: who are you\nAssistant:", return_tensors="pt").input_ids)
    with torch.no_grad():
        torch.testing.assert_close(m1(ids).logits, m2(ids).logits, rtol=1e-4, atol=1e-4)

    readme = train.write_models_readme(tmp_path).read_text()
    assert f"{record['final_loss']:.3f}" in readme and "tiny-internlm2-llama" in readme


@pytest.mark.slow
def test_train_rwkv7_end_to_end(tmp_path):
    out = train.train("tiny-rwkv7", steps=1, out_dir=tmp_path / "r", eval_limit=3, progress=False)
    model, tok = models.load(out)
    assert model.config.model_type == "rwkv7" and model.config.wkv_mode == "chunk"
    assert tok("hello").input_ids[0] != BOS_ID  # the RWKV flavour adds no BOS
    assert not (tmp_path / "r-llama").exists()


@pytest.mark.parametrize("name, message", [
    ("tiny-internlm2-llama", "converted"), ("tiny-gpt", "tiny-internlm2, tiny-rwkv7"),
])
def test_bad_names(name, message):
    with pytest.raises(ParityKitError, match=message):
        train.train(name, steps=1)


def test_zero_steps_is_an_error(tmp_path):
    with pytest.raises(ParityKitError, match="steps=0"):
        train.train("tiny-internlm2", steps=0, out_dir=tmp_path / "x")


@pytest.mark.parametrize("device, message", [("tpu", "not a torch device|runs on 'cpu' or 'cuda'"),
                                             ("meta", "runs on 'cpu' or 'cuda'")])
def test_a_device_training_cannot_use_is_refused(tmp_path, device, message):
    with pytest.raises(ParityKitError, match=message):
        train.train("tiny-internlm2", steps=1, out_dir=tmp_path / "x", device=device)
    assert not (tmp_path / "x").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_cuda_without_a_gpu_is_refused(tmp_path):
    with pytest.raises(ParityKitError, match="no CUDA GPU"):
        train.train("tiny-internlm2", steps=1, out_dir=tmp_path / "x", device="cuda")


def test_batch_size_override_is_recorded(tmp_path):
    out = train.train("tiny-internlm2", steps=2, batch_size=3, out_dir=tmp_path / "b", eval_limit=4, progress=False)
    record = json.loads((out / "training.json").read_text())
    assert record["settings"]["batch_size"] == 3 and record["tokens_seen"] == 2 * 3 * 256
    assert record["command"] == "parity-kit train tiny-internlm2 --seed 0 --steps 2 --batch-size 3"
    assert record["environment"]["device"] == "cpu"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_train_on_cuda_writes_cpu_loadable_weights(tmp_path):
    out = train.train("tiny-rwkv7", steps=3, out_dir=tmp_path / "g", eval_limit=4, progress=False, device="cuda")
    record = json.loads((out / "training.json").read_text())
    assert record["environment"]["device"].startswith("cuda") and "--device cuda" in record["command"]
    model, _ = models.load(out)
    assert next(model.parameters()).device.type == "cpu" and record["eval"]["with_bos"]["n"] == 4
