"""Stage 3 (vqdna/train/finetune.py): GUE CSV reading and its errors, LoRA set-up (loud failure when no
target matches; only adapters and head train), and a tiny pre-train + fine-tune that beats chance on a
synthetic but learnable task (GC-rich vs AT-rich), classification and regression."""

import json
import math

import numpy as np
import pytest
import torch

from tests.train import _mlm
from tests.train._mlm import one_thread  # noqa: F401  (autouse)
from vqdna.train.finetune import apply_lora, finetune, load_task, read_gue_csv, summarize_seeds, train_lora


def test_read_gue_csv_errors_name_file_and_line(tmp_path):
    path = tmp_path / "train.csv"
    path.write_text("sequence,label\nACGT,1\nACGT\n")
    with pytest.raises(ValueError, match=r"train.csv: line 3"):
        read_gue_csv(str(path))
    path.write_text("seq,y\nACGT,1\n")
    with pytest.raises(ValueError, match=r"train.csv: line 1: expected the header"):
        read_gue_csv(str(path))
    path.write_text("sequence,label\r\nACGT,1\r\nGGCC,0\r\n")  # CRLF as some GUE copies have
    assert read_gue_csv(str(path)) == (["ACGT", "GGCC"], ["1", "0"])


def test_load_task_kinds(tmp_path):
    _mlm.write_gue(tmp_path / "cls", sizes=(4, 2, 2), length=10)
    splits, task = load_task(str(tmp_path / "cls"))
    assert task == "classification" and splits["train"][1].dtype == torch.long
    _mlm.write_gue(tmp_path / "reg", sizes=(4, 2, 2), length=10, labels=lambda s: [0.5] * len(s))
    splits, task = load_task(str(tmp_path / "reg"))
    assert task == "regression" and splits["dev"][1].dtype == torch.float32
    with pytest.raises(FileNotFoundError, match="test.csv"):
        (tmp_path / "reg" / "test.csv").unlink()
        load_task(str(tmp_path / "reg"))


def _classifier():
    from transformers import AutoModelForSequenceClassification

    folder, _ = _mlm.pretrained()
    return AutoModelForSequenceClassification.from_pretrained(folder, num_labels=2)


def test_lora_fails_loudly_without_matching_targets():
    with pytest.raises(ValueError, match="match no Linear module"):
        apply_lora(_classifier(), target_modules=["Wqkv"])
    with pytest.raises(ValueError, match=r"\['qkv'\] match no"):
        apply_lora(_classifier(), target_modules=["query", "qkv"])


def test_lora_trains_only_adapters_and_head(tmp_path):
    from vqdna.train.finetune import EncodedTask

    folder, _ = _mlm.pretrained()
    tok = _mlm.tokenizer()
    _mlm.write_gue(tmp_path / "task", sizes=(320, 80, 80))
    splits, task = load_task(str(tmp_path / "task"))
    data = {s: EncodedTask(tok.encode_codes(q), y) for s, (q, y) in splits.items()}
    before = {k: v.clone() for k, v in _classifier().state_dict().items()}
    model, res = train_lora(folder, tok, data, task, 2, lr=1e-2, epochs=3, batch_size=16, seed=0,
                            out_dir=str(tmp_path / "run"), lora=dict(r=8, alpha=16, dropout=0.05), weight_decay=0.01)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n or "modules_to_save" in n for n in trainable)
    assert any("query.lora_A" in n for n in trainable) and any("classifier.modules_to_save" in n for n in trainable)
    # after training: every base weight is bit-identical; every adapter moved; the head moved
    merged_names = set()
    for n, p in model.named_parameters():
        if "lora_" in n or "modules_to_save" in n or "original_module" in n:
            continue
        base = n.replace("base_model.model.", "").replace(".base_layer", "")
        assert torch.equal(p.detach(), before[base]), n
        merged_names.add(base)
    assert any(n.endswith("query.weight") for n in merged_names) and len(merged_names) > 10
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and all(p.abs().sum() > 0 for p in lora_b)  # lora_B starts at zero
    head = dict(model.named_parameters())["base_model.model.classifier.modules_to_save.default.weight"]
    assert not torch.equal(head.detach(), before["classifier.weight"])
    # GC-rich vs AT-rich is learnable: far above chance (MCC 0)
    assert res["test"]["mcc"] > 0.5, res
    assert 1 <= res["best_epoch"] <= 3 and len(res["dev_by_epoch"]) == 3
    # the run reports its best epoch on dev (the model loaded at the end), not its last
    assert res["dev"]["mcc"] == pytest.approx(max(res["dev_by_epoch"]), abs=1e-9)
    assert res["best_epoch"] == 1 + int(np.argmax(res["dev_by_epoch"]))


def test_lora_run_reports_its_best_epoch_not_its_last(tmp_path, monkeypatch):
    """The run's reported model is its best epoch on dev, loaded at the end, not its last. The first epoch is
    made the best whatever the training does (its dev evaluation gets +10); what the run then reports for
    dev must be the first epoch's model's real score."""
    import vqdna.train.finetune as ft
    from vqdna.train.finetune import EncodedTask

    real, scores = ft.task_metrics, []

    def first_epoch_wins(task):
        metric, fn = real(task)

        def scored(logits, labels):
            out = fn(logits, labels)
            scores.append(out[metric])
            return {**out, metric: out[metric] + 10} if len(scores) == 1 else out

        return metric, scored

    monkeypatch.setattr(ft, "task_metrics", first_epoch_wins)
    folder, _ = _mlm.pretrained()
    tok = _mlm.tokenizer()
    _mlm.write_gue(tmp_path / "task", sizes=(320, 80, 80))
    splits, task = load_task(str(tmp_path / "task"))
    data = {s: EncodedTask(tok.encode_codes(q), y) for s, (q, y) in splits.items()}
    _, res = train_lora(folder, tok, data, task, 2, lr=1e-2, epochs=3, batch_size=16, seed=0,
                        out_dir=str(tmp_path / "run"), lora=dict(r=8, alpha=16, dropout=0.0), weight_decay=0.01)
    assert len(scores) == 5  # three epochs' dev evaluations, then the reported model on dev and on test
    assert res["dev_by_epoch"] == [scores[0] + 10, scores[1], scores[2]] and res["best_epoch"] == 1
    assert res["dev"]["mcc"] == pytest.approx(scores[0], abs=1e-9) == scores[3]


def test_finetune_grid_writes_results(tmp_path):
    folder, _ = _mlm.pretrained()
    data = _mlm.write_gue(tmp_path / "task", sizes=(64, 32, 32))
    res = finetune(data, folder, str(tmp_path / "out"), lrs=(1e-3, 1e-2), epochs=1, batch_size=16, seeds=(0, 1))
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["test"]["mcc"]["mean"] == pytest.approx(res["test"]["mcc"]["mean"])
    assert set(saved["test"]) == {"mcc", "f1", "accuracy", "loss"} and saved["metric"] == "mcc"
    assert len(saved["runs"]) == 4 and len(saved["chosen"]) == 2
    for c in saved["chosen"]:  # per seed: the best fine-tuned run when it beats the probe head (epoch 0) by the margin
        best = max(r["dev"]["mcc"] for r in saved["runs"] if r["seed"] == c["seed"])
        beats = best > saved["probe"]["dev"]["mcc"] and c["dev_win_probability"] >= saved["min_dev_confidence"]
        assert c["source"] == ("finetuned" if beats else "probe") and (c["best_epoch"] == 0) == (c["source"] == "probe")
        assert c["dev"]["mcc"] == (best if beats else saved["probe"]["dev"]["mcc"])
    assert saved["tokenizer_sha256"] == _mlm.tokenizer().tokenizer_sha256
    assert saved["test"] == summarize_seeds(saved["chosen"])


def test_summarize_seeds_is_mean_and_sample_std():
    chosen = [{"test": {"mcc": v, "f1": 1 - v}} for v in (0.2, 0.4, 0.9)]
    got = summarize_seeds(chosen)
    assert got["mcc"]["mean"] == pytest.approx(0.5) and got["f1"]["mean"] == pytest.approx(0.5)
    sd = math.sqrt(((0.2 - 0.5) ** 2 + (0.4 - 0.5) ** 2 + (0.9 - 0.5) ** 2) / 2)  # ddof 1
    assert got["mcc"]["std"] == pytest.approx(sd) and got["f1"]["std"] == pytest.approx(sd)
    assert summarize_seeds(chosen[:1])["mcc"] == {"mean": 0.2, "std": 0.0}


@pytest.mark.slow
def test_finetune_regression(tmp_path):
    folder, _ = _mlm.pretrained()
    gc = lambda seqs: [f"{np.mean([c in 'GC' for c in s]):.4f}" for s in seqs]  # noqa: E731
    data = _mlm.write_gue(tmp_path / "task", sizes=(320, 64, 64), labels=gc)
    res = finetune(data, folder, str(tmp_path / "out"), lrs=(1e-2,), epochs=3, batch_size=16)
    assert res["task"] == "regression" and res["metric"] == "spearman"
    assert res["test"]["spearman"]["mean"] > 0.4, res["test"]


def _encoded_task(tmp_path, labels=None, sizes=(320, 80, 80)):
    from vqdna.train.finetune import EncodedTask

    tok = _mlm.tokenizer()
    kwargs = {} if labels is None else {"labels": labels}
    _mlm.write_gue(tmp_path / "task", sizes=sizes, **kwargs)
    splits, task = load_task(str(tmp_path / "task"))
    return {s: EncodedTask(tok.encode_codes(q), y) for s, (q, y) in splits.items()}, task


@pytest.mark.parametrize("kind,pooling", [("classification", "cls"), ("regression", "cls"),
                                          ("classification", "mean_layers"), ("classification", "mean_wide")])
def test_probe_head_is_what_the_model_computes(tmp_path, monkeypatch, kind, pooling):
    """The probe's state, loaded into the classifier, reproduces the probe's own dev metric through the
    model's forward (pooler = standardise + tanh, classifier = the fitted linear model), and the frozen
    features of the learnable GC task give a probe far above chance. Its strength comes from the baseline's
    grid, and a choice at the grid's edge would be said."""
    from transformers import AutoModelForSequenceClassification

    import vqdna.train.baseline as baseline
    from vqdna.train.finetune import PROBE_SCALES, classification_metrics, pooled_features, probe_head, regression_metrics

    edges, fitted = [], []
    monkeypatch.setattr(baseline, "warn_at_grid_edge", lambda *a: edges.append(a))
    linear_model = baseline.linear_model  # the baseline's estimators (logistic: the converged one) fit every probe
    monkeypatch.setattr(baseline, "linear_model", lambda t, c: fitted.append((t, c)) or linear_model(t, c))

    gc = lambda seqs: [f"{np.mean([c in 'GC' for c in s]):.4f}" for s in seqs]  # noqa: E731
    data, task = _encoded_task(tmp_path, labels=gc if kind == "regression" else None)
    assert task == kind
    folder, _ = _mlm.pretrained()
    num_labels = 2 if kind == "classification" else 1
    model = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=num_labels,
                                                               classifier_pooling=pooling).eval()
    probe = probe_head(model, data, task, num_labels)
    # one strength grid per scale; the chosen (scale, strength) is dev's best of them all
    assert [what for what, _ in edges] == [f"the probe head (scale {s:g})" for s in PROBE_SCALES]
    assert all(list(dev) == list(baseline.REGULARIZATION) for _, dev in edges)
    assert fitted == [(kind, c) for c in baseline.REGULARIZATION] * len(PROBE_SCALES)
    dev_by_scale = dict(zip(PROBE_SCALES, (dev for _, dev in edges)))
    assert dev_by_scale[probe["scale"]][probe["regularization"]] == max(max(d.values()) for d in dev_by_scale.values()) \
        == probe["dev"]["mcc" if kind == "classification" else "spearman"]
    metric, fn = ("mcc", classification_metrics) if kind == "classification" else ("spearman", regression_metrics)
    assert probe["dev"][metric] > 0.5 and probe["test"][metric] > 0.5, probe
    wide = {"token_layer.0.weight", "token_layer.0.bias"} if pooling == "mean_wide" else set()
    assert set(probe["state"]) == {"pooler.0.weight", "pooler.0.bias", "classifier.weight", "classifier.bias"} | wide
    assert probe["state"]["classifier.weight"].shape == (num_labels, model.config.pooled_size)
    # the pooler standardises with the training split's statistics (dev chooses the strength, test is scored),
    # of the features of the probe's token layer for "mean_wide" (probe_head set it in the model)
    if wide:
        assert all(torch.equal(model.state_dict()[k], probe["state"][k]) for k in wide)
    train = pooled_features(model, data["train"], model.config.codebook_sizes)
    scale = probe["scale"] / np.maximum(train.std(0), 1e-6)
    torch.testing.assert_close(probe["state"]["pooler.0.weight"], torch.diag(torch.tensor(scale, dtype=torch.float32)))
    torch.testing.assert_close(probe["state"]["pooler.0.bias"], torch.tensor(-scale * train.mean(0), dtype=torch.float32))
    model.load_state_dict(probe["state"], strict=False)
    from vqdna.train.finetune import ClassificationCollator

    batch = ClassificationCollator(_mlm.tokenizer().codebook_sizes)([data["dev"][i] for i in range(len(data["dev"]))])
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    got = fn(logits.double().numpy(), batch["labels"].numpy())
    assert got[metric] == pytest.approx(probe["dev"][metric], abs=1e-6)


def test_probe_features_are_computed_in_the_fine_tuning_precision(tmp_path, monkeypatch):
    """Where fine-tuning runs under bf16 autocast (a GPU: fine_tune_bf16), the probe's features are computed under
    it too, so the probe head is exactly the fine-tuning's epoch 0. With bf16 forced on this CPU: the probe's
    features are not the float32 ones, and its dev metric is what the classifier computes under bf16 autocast."""
    import vqdna.train.finetune as ft
    from vqdna.models.bert import load_classifier

    data, task = _encoded_task(tmp_path)
    folder, _ = _mlm.pretrained()
    model = load_classifier(folder, num_labels=2, classifier_pooling="mean_wide", classifier_width=256).eval()
    sizes = _mlm.tokenizer().codebook_sizes
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the probe on this CPU, as the check below
    monkeypatch.setattr(ft, "fine_tune_bf16", lambda device: True)
    probe = ft.probe_head(model, data, task, 2)
    bf16 = ft.pooled_features(model, data["dev"], sizes)
    monkeypatch.setattr(ft, "fine_tune_bf16", lambda device: False)
    assert np.abs(bf16 - ft.pooled_features(model, data["dev"], sizes)).max() > 1e-4  # bf16 did run
    model.load_state_dict(probe["state"], strict=False)
    collate = ft.ClassificationCollator(sizes)
    logits = []
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        for i in range(0, len(data["dev"]), 64):  # pooled_features' batches: the same bf16 arithmetic
            batch = collate([data["dev"][j] for j in range(i, min(i + 64, len(data["dev"])))])
            logits.append(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.double())
    got = ft.classification_metrics(torch.cat(logits).numpy(), data["dev"].labels.numpy())["mcc"]
    assert got == pytest.approx(probe["dev"]["mcc"], abs=1e-6) and probe["dev"]["mcc"] > 0.5


def test_wide_probe_token_layer_is_random_features_of_standardised_states(tmp_path, monkeypatch):
    """"mean_wide"'s probe token layer: relu(R (x - mean) / std + b) with mean and std over the real tokens
    (both strands) of the first TOKEN_STATS_ITEMS training items, so the pre-activations average to b
    (in [-1, 1]) over those tokens; R ~ N(0, 1 / S); the same model and data give the same layer; later
    items do not count."""
    import vqdna.train.finetune as ft
    from vqdna.models.bert import load_classifier

    folder, _ = _mlm.pretrained()
    tok = _mlm.tokenizer()
    _mlm.write_gue(tmp_path / "task", sizes=(24, 8, 8))
    seqs, labels = load_task(str(tmp_path / "task"))[0]["train"]
    labels = torch.as_tensor(labels)
    data = ft.encode_task(tok, seqs, labels, None, "both")
    monkeypatch.setattr(ft, "TOKEN_STATS_ITEMS", 16)
    model = load_classifier(folder, num_labels=2, classifier_pooling="mean_wide", classifier_width=512).eval()
    state = ft.token_layer_probe_state(model, data, tok.codebook_sizes, batch_size=5)
    w, b = state["token_layer.0.weight"].double(), state["token_layer.0.bias"].double()
    size = model.config.layers_size
    assert w.shape == (512, size) and b.shape == (512,)
    batch = ft.ClassificationCollator(tok.codebook_sizes)([data[i] for i in range(16)])
    with torch.no_grad():
        xs = [torch.cat(model.vqdna(batch[k + "input_ids"], batch[k + "attention_mask"], output_hidden_states=True)
                        .hidden_states, -1)[batch[k + "attention_mask"].bool()] for k in ("", "rc_")]
    x = torch.cat(xs).double()
    pre = x @ w.T + b
    g = torch.Generator().manual_seed(ft.TOKEN_LAYER_SEED)
    want_r = torch.randn(512, size, generator=g, dtype=torch.float64) / math.sqrt(size)
    want_b = torch.rand(512, generator=g, dtype=torch.float64) * 2 - 1
    # (x - mean) averages to 0 over exactly these tokens, leaving b; std scales R back to unit-free
    torch.testing.assert_close(pre.mean(0), want_b, atol=2e-5, rtol=0)
    torch.testing.assert_close(w * x.std(0, unbiased=False), want_r, atol=1e-5, rtol=1e-4)
    assert 0.3 < float((pre > 0).double().mean()) < 0.7  # about half the features fire
    torch.testing.assert_close(ft.token_layer_probe_state(model, data, tok.codebook_sizes, batch_size=16), state)
    later = ft.encode_task(tok, seqs[:16] + seqs[:8], torch.cat([labels[:16], labels[:8]]), None, "both")
    assert torch.equal(ft.token_layer_probe_state(model, later, tok.codebook_sizes, batch_size=5)["token_layer.0.bias"],
                       state["token_layer.0.bias"])
    monkeypatch.setattr(ft, "TOKEN_STATS_ITEMS", 8)
    assert not torch.equal(ft.token_layer_probe_state(model, data, tok.codebook_sizes)["token_layer.0.bias"],
                           state["token_layer.0.bias"])
    # a window of 3 tokens: R [P, 3 S] ~ N(0, 1 / 3S) over the window's states, each standardised as a token's
    monkeypatch.setattr(ft, "TOKEN_STATS_ITEMS", 16)
    wide = load_classifier(folder, num_labels=2, classifier_pooling="mean_wide", classifier_width=512,
                           classifier_window=3).eval()
    state3 = ft.token_layer_probe_state(wide, data, tok.codebook_sizes, batch_size=5)
    w3, b3 = state3["token_layer.0.weight"].double(), state3["token_layer.0.bias"].double()
    g = torch.Generator().manual_seed(ft.TOKEN_LAYER_SEED)
    want_r3 = torch.randn(512, 3 * size, generator=g, dtype=torch.float64) / math.sqrt(3 * size)
    want_b3 = torch.rand(512, generator=g, dtype=torch.float64) * 2 - 1
    torch.testing.assert_close(w3 * x.std(0, unbiased=False).repeat(3), want_r3, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(b3 + w3 @ x.mean(0).repeat(3), want_b3, atol=2e-5, rtol=0)


def test_finetune_starts_from_the_probe_head(tmp_path, monkeypatch):
    import vqdna.train.finetune as ft

    folder, _ = _mlm.pretrained()
    data = _mlm.write_gue(tmp_path / "task", sizes=(64, 32, 32))
    seen = []
    real = ft.train_lora
    monkeypatch.setattr(ft, "train_lora", lambda *a, **k: seen.append(k.get("head_state")) or real(*a, **k))
    res = finetune(data, folder, str(tmp_path / "out"), lrs=(1e-3,), epochs=1, batch_size=16, head_init="probe")
    assert res["head_init"] == "probe" and set(res["probe"]) == {"scale", "regularization", "feature_std", "dev", "test", "state_file"}
    assert len(seen) == 1 and torch.is_tensor(seen[0]["classifier.weight"])
    res = finetune(data, folder, str(tmp_path / "out2"), lrs=(1e-3,), epochs=1, batch_size=16, head_init="random")
    assert res["probe"] is None and seen[-1] is None
    with pytest.raises(ValueError, match="head_init"):
        finetune(data, folder, str(tmp_path / "out3"), lrs=(1e-3,), epochs=1, head_init="linear")


@pytest.mark.parametrize("dropout", [0.0, None])
def test_train_lora_dropout(tmp_path, dropout):
    """dropout=0 switches off the model's hidden, attention and classifier dropout while fine-tuning (a
    training-mode forward is then deterministic); None keeps the pre-trained config's (0.1 here)."""
    folder, _ = _mlm.pretrained()
    data, task = _encoded_task(tmp_path, sizes=(32, 16, 16))
    model, _ = train_lora(folder, _mlm.tokenizer(), data, task, 2, lr=1e-3, epochs=1, batch_size=16, seed=0,
                          out_dir=str(tmp_path / "run"), lora=dict(r=8, alpha=16, dropout=0.0), weight_decay=0.01,
                          dropout=dropout)
    cfg = model.config
    expected = 0.1 if dropout is None else 0.0
    assert cfg.hidden_dropout_prob == cfg.attention_probs_dropout_prob == expected
    from vqdna.train.finetune import ClassificationCollator

    batch = ClassificationCollator(_mlm.tokenizer().codebook_sizes)([data["dev"][i] for i in range(8)])
    model.train()
    with torch.no_grad():
        a, b = (model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits for _ in range(2))
    assert torch.equal(a, b) == (dropout == 0.0)


def test_finetune_records_and_checks_dropout(tmp_path, monkeypatch):
    import vqdna.train.finetune as ft

    folder, _ = _mlm.pretrained()
    data = _mlm.write_gue(tmp_path / "task", sizes=(32, 16, 16))
    seen = []
    monkeypatch.setattr(ft, "train_lora", lambda *a, **k: seen.append(k["dropout"]) or (None, _fake_run()))
    res = finetune(data, folder, str(tmp_path / "out"), lrs=(1e-3,), epochs=1, batch_size=16, head_init="random")
    assert seen == [0.0] and res["dropout"] == 0.0  # the default
    res = finetune(data, folder, str(tmp_path / "out"), lrs=(1e-3,), epochs=1, batch_size=16, head_init="random",
                   dropout=None)
    assert seen[-1] is None and res["dropout"] is None
    for bad in (1.0, -0.1):
        with pytest.raises(ValueError, match="dropout"):
            finetune(data, folder, str(tmp_path / "out"), lrs=(1e-3,), epochs=1, dropout=bad)


def _fake_run():
    m = {"mcc": 0.5, "f1": 0.5, "accuracy": 0.5, "loss": 1.0}
    return {"lr": 1e-3, "seed": 0, "best_epoch": 1, "dev": m, "test": m, "dev_by_epoch": [0.5]}


@pytest.mark.parametrize("pooling", ["cls", "mean_wide"])
def test_probe_pooler_stays_frozen_and_is_saved(tmp_path, pooling):
    """From the probe head, the pooler (the probe's standardisation) and "mean_wide"'s token layer (its
    random features) do not train, the classifier does, and the adapter checkpoint carries them all (a fresh
    model would otherwise get a random pooler and token layer)."""
    import glob

    from safetensors.torch import load_file
    from transformers import AutoModelForSequenceClassification

    from vqdna.train.finetune import probe_head

    folder, _ = _mlm.pretrained()
    data, task = _encoded_task(tmp_path, sizes=(64, 32, 32))
    base = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=2, classifier_pooling=pooling)
    state = probe_head(base, data, task, 2)["state"]
    model, _ = train_lora(folder, _mlm.tokenizer(), data, task, 2, lr=1e-2, epochs=1, batch_size=16, seed=0,
                          out_dir=str(tmp_path / "run"), lora=dict(r=8, alpha=16, dropout=0.0), weight_decay=0.01,
                          head_state=state, dropout=0.0, head_config={"classifier_pooling": pooling})
    params = dict(model.named_parameters())
    fixed = ["pooler"] + (["token_layer"] if pooling == "mean_wide" else [])
    saved = load_file(glob.glob(str(tmp_path / "run" / "checkpoint-*" / "adapter_model.safetensors"))[0])
    for module in fixed:
        names = [n for n in params if f".{module}." in n and "modules_to_save" in n]
        assert names and not any(params[n].requires_grad for n in names)
        assert torch.equal(params[f"base_model.model.{module}.modules_to_save.default.0.weight"], state[f"{module}.0.weight"])
        key = next(k for k in saved if module in k and k.endswith("0.weight"))
        assert torch.equal(saved[key], state[f"{module}.0.weight"])
    assert not torch.equal(params["base_model.model.classifier.modules_to_save.default.weight"].detach(),
                           state["classifier.weight"])


def _fake_train_lora(dev_mcc):
    """train_lora stand-in: a run whose best dev MCC is dev_mcc (test MCC 0.123: recognisable); its dev
    predictions are the labels (dev_mcc >= 0) or their opposite."""
    def fake(*args, **kwargs):
        m = {"mcc": dev_mcc, "f1": 0.5, "accuracy": 0.5, "loss": 1.0}
        labels = args[2]["dev"].labels.numpy()
        return None, {"lr": args[5], "seed": args[8], "best_epoch": 2, "dev": m, "test": {**m, "mcc": 0.123},
                      "dev_by_epoch": [dev_mcc - 0.1, dev_mcc], "dev_pred": labels if dev_mcc >= 0 else 1 - labels}
    return fake


def test_selection_includes_the_probe_head_as_epoch_0(tmp_path, monkeypatch):
    """A seed whose fine-tuned runs are all worse on dev than the probe head reports the probe head itself
    (source "probe", epoch 0): a run never ends below its own start on dev. Better runs still win."""
    import vqdna.train.finetune as ft

    folder, _ = _mlm.pretrained()
    data = _mlm.write_gue(tmp_path / "task", sizes=(64, 32, 32))
    monkeypatch.setattr(ft, "train_lora", _fake_train_lora(-0.5))
    res = finetune(data, folder, str(tmp_path / "out"), lrs=(1e-3, 1e-2), epochs=2, batch_size=16, seeds=(0, 1))
    probe = res["probe"]
    assert probe["dev"]["mcc"] > -0.5
    assert [c["source"] for c in res["chosen"]] == ["probe", "probe"] and res["chosen"][0]["best_epoch"] == 0
    assert res["test"]["mcc"]["mean"] == pytest.approx(probe["test"]["mcc"])
    assert set(res["test"]) == {"mcc", "f1", "accuracy", "loss"}  # the probe reports the model's loss too
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["chosen"][1]["source"] == "probe" and len(saved["runs"]) == 4
    from safetensors.torch import load_file  # the reported model is kept: the probe head's tensors

    kept = load_file(tmp_path / "out" / saved["probe"]["state_file"])
    assert set(kept) == {"pooler.0.weight", "pooler.0.bias", "classifier.weight", "classifier.bias"}
    monkeypatch.setattr(ft, "train_lora", _fake_train_lora(1.0))
    res = finetune(data, folder, str(tmp_path / "out"), lrs=(1e-3,), epochs=2, batch_size=16)
    assert res["chosen"][0]["source"] == "finetuned" and res["test"]["mcc"]["mean"] == 0.123


@pytest.mark.parametrize("gain,win,confidence,source", [(0.03, 0.90, 0.95, "probe"), (0.03, 0.96, 0.95, "finetuned"),
                                                         (0.03, 0.90, 0.0, "finetuned"), (-0.01, 0.99, 0.95, "probe")])
def test_finetuning_must_beat_the_probe_beyond_dev_noise(tmp_path, monkeypatch, gain, win, confidence, source):
    """The best fine-tuned run replaces the probe head only when it is better on dev and wins at least
    min_dev_confidence of the paired bootstrap resamples (dev_win_probability, reported per seed)."""
    import vqdna.train.finetune as ft

    folder, _ = _mlm.pretrained()
    data = _mlm.write_gue(tmp_path / "task", sizes=(64, 32, 32))
    monkeypatch.setattr(ft, "train_lora", _fake_train_lora(-1.0))
    probe_dev = finetune(data, folder, str(tmp_path / "p"), lrs=(1e-3,), epochs=1)["probe"]["dev"]["mcc"]
    monkeypatch.setattr(ft, "train_lora", _fake_train_lora(probe_dev + gain))
    seen = []
    monkeypatch.setattr(ft, "dev_win_probability", lambda *a, **k: seen.append(a) or win)
    res = finetune(data, folder, str(tmp_path / "out"), lrs=(1e-3,), epochs=1, min_dev_confidence=confidence)
    assert res["chosen"][0]["source"] == source and res["chosen"][0]["dev_win_probability"] == win
    assert res["min_dev_confidence"] == confidence and len(seen) == 1 and seen[0][0] == "classification"
    assert res["test"]["mcc"]["mean"] == (0.123 if source == "finetuned" else pytest.approx(res["probe"]["test"]["mcc"]))
    assert "dev_pred" not in res["chosen"][0] and all("dev_pred" not in r for r in res["runs"])
    with pytest.raises(ValueError, match="min_dev_confidence"):
        finetune(data, folder, str(tmp_path / "bad"), lrs=(1e-3,), epochs=1, min_dev_confidence=1.5)


def test_dev_win_probability_is_a_paired_bootstrap():
    from scipy.stats import spearmanr
    from sklearn.metrics import matthews_corrcoef

    from vqdna.train.finetune import _mcc_rows, _spearman_rows, dev_win_probability

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, (5, 40))
    pred = np.where(rng.random((5, 40)) < 0.6, labels, rng.integers(0, 3, (5, 40)))
    pred[0] = 1  # a constant prediction: MCC undefined -> 0, as sklearn
    assert np.allclose(_mcc_rows(labels, pred, 3), [matthews_corrcoef(a, b) for a, b in zip(labels, pred)])
    values, noisy = rng.normal(size=(4, 30)), rng.normal(size=(4, 30))
    noisy[1] = np.round(noisy[1])  # ties
    assert np.allclose(_spearman_rows(values, values + noisy), [spearmanr(a, a + b).statistic for a, b in zip(values, noisy)])
    y = rng.integers(0, 2, 600)
    worse = np.where(rng.random(600) < 0.3, 1 - y, y)
    assert dev_win_probability("classification", y, y, worse) == 1.0
    assert dev_win_probability("classification", y, worse, y) == 0.0
    assert dev_win_probability("classification", y, worse, worse) == 0.5  # every resample a tie
    one_better = worse.copy()
    one_better[np.flatnonzero(worse != y)[0]] = y[np.flatnonzero(worse != y)[0]]  # one of 600 rows fixed
    assert 0.5 < dev_win_probability("classification", y, one_better, worse) < 0.95  # not beyond the noise
    x = rng.normal(size=500)
    assert dev_win_probability("regression", x, x + 0.1 * rng.normal(size=500), x + rng.normal(size=500)) == 1.0
    assert dev_win_probability("classification", y, worse, y, seed=1) == dev_win_probability("classification", y, worse, y, seed=1)


def test_probe_loss_is_the_models_loss(tmp_path):
    """The probe's reported "loss" is the cross-entropy the classifier's forward computes with its state."""
    from vqdna.models.bert import load_classifier
    from vqdna.train.finetune import ClassificationCollator, probe_head

    folder, _ = _mlm.pretrained()
    data, task = _encoded_task(tmp_path, sizes=(64, 32, 32))
    model = load_classifier(folder, num_labels=2).eval()
    probe = probe_head(model, data, task, 2)
    model.load_state_dict(probe["state"], strict=False)
    batch = ClassificationCollator(_mlm.tokenizer().codebook_sizes)([data["test"][i] for i in range(len(data["test"]))])
    with torch.no_grad():
        loss = model(**batch).loss
    assert probe["test"]["loss"] == pytest.approx(float(loss), rel=1e-4)


def test_finetune_reports_the_kmer_baseline(tmp_path, monkeypatch):
    import vqdna.train.finetune as ft
    from vqdna.train.baseline import kmer_baseline

    folder, _ = _mlm.pretrained()
    data = _mlm.write_gue(tmp_path / "task", sizes=(64, 32, 32))
    monkeypatch.setattr(ft, "train_lora", _fake_train_lora(0.5))
    res = finetune(data, folder, str(tmp_path / "out"), lrs=(1e-3,), epochs=1, baseline_k=3, head_init="random")
    splits, task = load_task(data)
    assert res["baseline"] == kmer_baseline(splits, task, k=3) and res["baseline"]["k"] == 3
    assert res["baseline"]["strands"] == "forward"
    assert json.loads((tmp_path / "out" / "results.json").read_text())["baseline"]["test"] == res["baseline"]["test"]
    table = ft.format_results(res)
    assert "3-mer frequencies + logistic regression" in table and "lr 0.001 epoch 2" in table
    assert f"{res['baseline']['test']['mcc']:.4f}" in table
    assert finetune(data, folder, str(tmp_path / "o2"), lrs=(1e-3,), epochs=1, head_init="random")["baseline"] is None
    # a model that reads both strands is compared with k-mers counted on both strands
    res = finetune(data, folder, str(tmp_path / "o3"), lrs=(1e-3,), epochs=1, baseline_k=3, head_init="random",
                   strands="both")
    assert res["baseline"] == kmer_baseline(splits, task, k=3, strands="both")
    assert "3-mer frequencies (both strands) + logistic regression" in ft.format_results(res)


@pytest.mark.parametrize("pooling", ["mean", "mean_layers", "mean_wide"])
def test_finetune_pooling_override(tmp_path, monkeypatch, pooling):
    """pooling= reaches both the probe (its head's width follows it) and every fine-tuning run; bad values
    are refused."""
    import vqdna.train.finetune as ft

    folder, _ = _mlm.pretrained()
    data = _mlm.write_gue(tmp_path / "task", sizes=(32, 16, 16))
    seen = []
    fake = _fake_train_lora(0.5)
    monkeypatch.setattr(ft, "train_lora", lambda *a, **k: seen.append((k["head_config"], k["head_state"])) or fake(*a, **k))
    res = finetune(data, folder, str(tmp_path / "out"), lrs=(1e-3,), epochs=1, pooling=pooling)
    width = {"mean": 64, "mean_layers": 64 * 3, "mean_wide": 2048}[pooling]  # bert-tiny: hidden 64, 2 layers + embeddings
    assert [p for p, _ in seen] == [{"classifier_pooling": pooling}] and res["pooling"] == pooling
    assert seen[0][1]["classifier.weight"].shape == (2, width)
    with pytest.raises(ValueError, match="pooling"):
        finetune(data, folder, str(tmp_path / "out"), lrs=(1e-3,), epochs=1, pooling="max")


def test_finetune_window_override(tmp_path, monkeypatch):
    """window= reaches the probe (its token layer reads window x the states of a token) and every fine-tuning
    run, results.json says it (None: the model's, 1); bad values are refused."""
    import vqdna.train.finetune as ft

    folder, _ = _mlm.pretrained()
    data = _mlm.write_gue(tmp_path / "task", sizes=(32, 16, 16))
    seen = []
    fake = _fake_train_lora(0.5)
    monkeypatch.setattr(ft, "train_lora", lambda *a, **k: seen.append((k["head_config"], k["head_state"])) or fake(*a, **k))
    res = finetune(data, folder, str(tmp_path / "out"), lrs=(1e-3,), epochs=1, pooling="mean_wide", window=3)
    (head, state), = seen
    assert head == {"classifier_pooling": "mean_wide", "classifier_window": 3} and res["window"] == 3
    assert state["token_layer.0.weight"].shape == (2048, 3 * 64 * 3)  # bert-tiny: 3 states of 64 per token
    assert finetune(data, folder, str(tmp_path / "o2"), lrs=(1e-3,), epochs=1, pooling="mean_wide")["window"] == 1
    assert seen[-1][1]["token_layer.0.weight"].shape == (2048, 64 * 3)
    with pytest.raises(ValueError, match="window must be >= 1"):
        finetune(data, folder, str(tmp_path / "out"), lrs=(1e-3,), epochs=1, window=0)


def test_finetune_strands_both_pools_each_sequence_and_its_reverse_complement(tmp_path, monkeypatch):
    """strands="both" reaches the probe and every run (head_config), every split carries the reverse
    complements' codes, and the probe's features are the mean over the two strands: the features of a
    sequence equal those of its reverse complement. None keeps the pre-trained config's ("forward")."""
    import vqdna.train.finetune as ft
    from vqdna.data.alphabet import reverse_complement

    folder, _ = _mlm.pretrained()
    data = _mlm.write_gue(tmp_path / "task", sizes=(32, 16, 16))
    seen, feats = [], []
    fake = _fake_train_lora(0.5)
    real_features = ft.pooled_features
    monkeypatch.setattr(ft, "pooled_features", lambda *a, **k: feats.append(real_features(*a, **k)) or feats[-1])
    monkeypatch.setattr(ft, "train_lora", lambda *a, **k: seen.append((k["head_config"], a[2])) or fake(*a, **k))
    res = finetune(data, folder, str(tmp_path / "out"), lrs=(1e-3,), epochs=1, pooling="mean", strands="both")
    (head, encoded), = seen
    assert head == {"classifier_pooling": "mean", "classifier_strands": "both"} and res["strands"] == "both"
    assert all(d.rc_codes is not None and len(d.rc_codes) == len(d.codes) for d in encoded.values())
    # a task whose dev split is the train split's reverse complements: the same both-strand features
    splits, _ = load_task(data)
    flipped = tmp_path / "flipped"
    flipped.mkdir()
    for split in ("train", "dev", "test"):
        seqs = splits["train"][0] if split == "train" else [reverse_complement(s) for s in splits["train"][0]]
        rows = "".join(f"{q},{int(y)}\n" for q, y in zip(seqs, splits["train"][1]))
        (flipped / f"{split}.csv").write_text("sequence,label\n" + rows)
    feats.clear()
    finetune(str(flipped), folder, str(tmp_path / "out2"), lrs=(1e-3,), epochs=1, pooling="mean", strands="both")
    np.testing.assert_allclose(feats[0], feats[1], rtol=0, atol=1e-5)
    feats.clear()
    res = finetune(str(flipped), folder, str(tmp_path / "out3"), lrs=(1e-3,), epochs=1, pooling="mean")
    assert res["strands"] == "forward" and seen[-1][0] == {"classifier_pooling": "mean"}
    assert seen[-1][1]["train"].rc_codes is None and np.abs(feats[0] - feats[1]).max() > 1e-3
    with pytest.raises(ValueError, match="strands"):
        finetune(data, folder, str(tmp_path / "out"), lrs=(1e-3,), epochs=1, strands="reverse")


def test_cls_probe_is_what_lora_steps_swamp(tmp_path):
    """Why fine-tuning from the probe head diverged (issue 18: training loss above chance, gradient norms
    > 100): with CLS pooling. Masked-LM pre-training never trains the CLS output, so its features barely
    vary between sequences; the probe's standardisation multiplies them by 0.5 / std, and AdamW's first
    steps (each LoRA entry moves by ~lr, whatever its gradient) shift them by more than their spread.
    Measured here: a few LoRA steps at lr 5e-4 from the CLS probe push the training loss far above ln 2
    with gradient norms > 50, while from the mean-pooled probe the loss stays low and the norms small.
    Hence `--pooling` on both commands and token means (now mean_wide) in `--preset small`."""
    from vqdna.models.bert import load_classifier
    from vqdna.train.finetune import ClassificationCollator, probe_head

    folder, _ = _mlm.pretrained()
    data, task = _encoded_task(tmp_path, sizes=(320, 80, 80))
    collate = ClassificationCollator(_mlm.tokenizer().codebook_sizes)
    stats = {}
    for pooling in ("cls", "mean"):
        off = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, classifier_dropout=0.0)
        probe = probe_head(load_classifier(folder, num_labels=2, classifier_pooling=pooling), data, task, 2)
        torch.manual_seed(0)
        model = load_classifier(folder, num_labels=2, classifier_pooling=pooling, **off)
        model.load_state_dict(probe["state"], strict=False)
        model = apply_lora(model, dropout=0.0)
        params = [p for n, p in model.named_parameters() if p.requires_grad and ".pooler." not in n]
        opt = torch.optim.AdamW(params, lr=5e-4, weight_decay=0.01)
        g = torch.Generator().manual_seed(0)
        losses, norms = [], []
        model.train()
        for _ in range(3):
            batch = collate([data["train"][i] for i in torch.randint(0, 320, (32,), generator=g).tolist()])
            loss = model(**batch).loss
            opt.zero_grad()
            loss.backward()
            norms.append(float(torch.nn.utils.clip_grad_norm_(params, 1.0)))
            losses.append(loss.item())
            opt.step()
        stats[pooling] = (probe["feature_std"]["median"], max(losses), max(norms))
    (cls_std, cls_loss, cls_norm), (mean_std, mean_loss, mean_norm) = stats["cls"], stats["mean"]
    assert cls_std < mean_std / 3, stats
    assert cls_loss > 2 * math.log(2) and cls_norm > 50, stats  # diverged
    assert mean_loss < math.log(2) and mean_norm < 5, stats  # did not
