"""Stage 3: LoRA fine-tuning of a pre-trained VQDNA model on a GUE-format task (peft + transformers.Trainer).

A task folder holds train.csv, dev.csv, test.csv with header `sequence,label`. Integer labels make a
classification task (metrics MCC, macro-F1, accuracy; MCC selects), other numbers a regression task
(Spearman selects; also Pearson and MSE). The encoder is frozen; LoRA (r 8, alpha 16, dropout 0.05 by
default) adapts the modules the model names (`lora_target_modules`) and the classifier head trains in
full, as do the pooler and the token layer when the head starts at random (from the linear probe they stay
the probe's fixed standardisation and random features). For every seed and learning rate of the grid the model trains for `epochs` epochs,
evaluated on dev after each; the (learning rate, epoch) with the best dev metric is chosen per seed, the
probe head itself competing as epoch 0, and its test metrics reported; the JSON summary gives the mean
and standard deviation over seeds, beside the probe head alone and (optionally) a k-mer baseline.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import warnings

import numpy as np
import torch
from torch.utils.data import Dataset

log = logging.getLogger(__name__)

SPLITS = ("train", "dev", "test")
HEAD_MODULES = ["token_layer", "pooler", "classifier"]  # those the model has; "token_layer": "mean_wide" only


def read_gue_csv(path: str):
    """(sequences, labels as strings) of a `sequence,label` CSV; errors name the file and line."""
    with open(path, newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None or [h.strip().lower() for h in header[:2]] != ["sequence", "label"]:
            raise ValueError(f"{path}: line 1: expected the header 'sequence,label', got {header}")
        seqs, labels = [], []
        for lineno, row in enumerate(reader, start=2):
            if not row:
                continue
            if len(row) != 2 or not row[0].strip() or not row[1].strip():
                raise ValueError(f"{path}: line {lineno}: expected 'sequence,label', got {row}")
            seqs.append(row[0].strip())
            labels.append(row[1].strip())
    if not seqs:
        raise ValueError(f"{path}: no records")
    return seqs, labels


def load_task(data_dir: str, task: str = "auto"):
    """{split: (sequences, labels)} and the task kind ("classification" | "regression"); labels are int64
    class indices (0..C-1, as given) or float32 values."""
    raw = {}
    for split in SPLITS:
        path = os.path.join(data_dir, f"{split}.csv")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path} is missing (a GUE task folder holds train.csv, dev.csv, test.csv)")
        raw[split] = read_gue_csv(path)
    every = [x for _, labels in raw.values() for x in labels]
    if task == "auto":
        task = "classification" if all(_is_int(x) for x in every) else "regression"
    out = {}
    for split, (seqs, labels) in raw.items():
        if task == "classification":
            bad = [i for i, x in enumerate(labels) if not _is_int(x) or int(x) < 0]
            if bad:
                raise ValueError(f"{data_dir}/{split}.csv: line {bad[0] + 2}: label {labels[bad[0]]!r} is not a class index >= 0")
            y = torch.tensor([int(x) for x in labels], dtype=torch.long)
        else:
            y = torch.tensor([float(x) for x in labels], dtype=torch.float32)
        out[split] = (seqs, y)
    return out, task


def _is_int(x: str) -> bool:
    try:
        int(x)
        return True
    except ValueError:
        return False


class EncodedTask(Dataset):
    """Pre-tokenized sequences: item i -> {"codes": [n_i, n_levels] int64, "labels": scalar} and, when
    rc_codes is given, "rc_codes": the reverse complement's codes [n_i, n_levels]."""

    def __init__(self, codes, labels, rc_codes=None):
        if rc_codes is not None and [len(c) for c in rc_codes] != [len(c) for c in codes]:
            raise ValueError("rc_codes must hold one code sequence per sequence, each as long as its forward strand's")
        self.codes, self.labels, self.rc_codes = codes, labels, rc_codes

    def __len__(self):
        return len(self.codes)

    def __getitem__(self, i):
        item = {"codes": self.codes[i], "labels": self.labels[i]}
        if self.rc_codes is not None:
            item["rc_codes"] = self.rc_codes[i]
        return item


def encode_task(tok, seqs, labels, max_bases: int | None = None, strands: str = "forward") -> EncodedTask:
    """EncodedTask of DNA strings; strands "both" also encodes each reverse complement (cut to the same
    max_bases: the other strand of the kept region, read from its own 5' end)."""
    codes = tok.encode_codes(seqs, max_bases)
    return EncodedTask(codes, labels, tok.encode_reverse_complement_codes(seqs, max_bases) if strands == "both" else None)


class ClassificationCollator:
    """Items of EncodedTask -> the classifier's batch: input_ids, attention_mask, labels and, when the
    items carry "rc_codes", rc_input_ids and rc_attention_mask padded to the forward strands' length."""

    def __init__(self, codebook_sizes):
        self.codebook_sizes = codebook_sizes

    def __call__(self, features):
        from vqdna.models.bert import build_inputs

        codes = [f["codes"] for f in features]
        both = "rc_codes" in features[0]
        if both:  # one padded batch of both strands, so both halves have one length
            codes += [f["rc_codes"] for f in features]
        ids, mask = build_inputs(codes, self.codebook_sizes, pad_to_multiple_of=8)
        batch = {"input_ids": ids[: len(features)], "attention_mask": mask[: len(features)],
                 "labels": torch.stack([f["labels"] for f in features])}
        if both:
            batch["rc_input_ids"], batch["rc_attention_mask"] = ids[len(features) :], mask[len(features) :]
        return batch


def classification_metrics(logits: np.ndarray, labels: np.ndarray) -> dict:
    from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

    pred = logits.argmax(-1)
    return {"mcc": float(matthews_corrcoef(labels, pred)), "f1": float(f1_score(labels, pred, average="macro")),
            "accuracy": float(accuracy_score(labels, pred))}


def regression_metrics(pred: np.ndarray, labels: np.ndarray) -> dict:
    from scipy.stats import pearsonr, spearmanr

    pred = pred.reshape(-1)
    constant = np.all(pred == pred[0])  # correlation of a constant is undefined: count it as 0
    return {"spearman": 0.0 if constant else float(spearmanr(pred, labels).statistic),
            "pearson": 0.0 if constant else float(pearsonr(pred, labels).statistic),
            "mse": float(np.mean((pred - labels) ** 2))}


def task_metrics(task: str):
    """(the metric that selects runs, the function computing all metrics) of a task kind."""
    return ("mcc", classification_metrics) if task == "classification" else ("spearman", regression_metrics)


def predictions(task: str, logits: np.ndarray) -> np.ndarray:
    """What the selection metric reads of model outputs [n, num_labels]: class ids int64 [n]
    (classification) or values float64 [n] (regression)."""
    logits = np.asarray(logits, dtype=np.float64)
    return logits.argmax(-1) if task == "classification" else logits.reshape(-1)


def _mcc_rows(labels: np.ndarray, pred: np.ndarray, classes: int) -> np.ndarray:
    """Matthews correlation (multiclass, Gorodkin's R_K; sklearn's matthews_corrcoef) of each row of
    labels / pred int [R, n]: float64 [R], 0 where undefined."""
    r, n = labels.shape
    cells = (np.arange(r)[:, None] * classes * classes + labels * classes + pred).reshape(-1)
    conf = np.bincount(cells, minlength=r * classes * classes).reshape(r, classes, classes).astype(np.float64)
    true_k, pred_k, correct = conf.sum(2), conf.sum(1), np.trace(conf, axis1=1, axis2=2)
    cov = correct * n - (true_k * pred_k).sum(1)
    den = np.sqrt((n * n - (pred_k ** 2).sum(1)) * (n * n - (true_k ** 2).sum(1)))
    return np.divide(cov, den, out=np.zeros(r), where=den > 0)


def _spearman_rows(labels: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """Spearman correlation of each row of labels / pred float [R, n]: float64 [R], 0 where undefined."""
    from scipy.stats import rankdata

    a, b = rankdata(labels, axis=1), rankdata(pred, axis=1)
    a, b = a - a.mean(1, keepdims=True), b - b.mean(1, keepdims=True)
    den = np.sqrt((a * a).sum(1) * (b * b).sum(1))
    return np.divide((a * b).sum(1), den, out=np.zeros(len(a)), where=den > 0)


def dev_win_probability(task: str, labels: np.ndarray, pred_a: np.ndarray, pred_b: np.ndarray,
                        rounds: int = 2000, seed: int = 0) -> float:
    """Paired bootstrap over the dev set: the fraction of `rounds` resamples (the same rows for both
    models) in which model a's selection metric (MCC / Spearman) beats model b's; ties count half.
    labels, pred_a, pred_b: [n] (`predictions`)."""
    labels, pred_a, pred_b = np.asarray(labels), np.asarray(pred_a), np.asarray(pred_b)
    rng = np.random.default_rng(seed)
    wins = 0.0
    for start in range(0, rounds, 250):  # blocks of resamples: memory ~250 x n x 8 bytes
        idx = rng.integers(0, len(labels), (min(250, rounds - start), len(labels)))
        if task == "classification":
            classes = int(max(labels.max(), pred_a.max(), pred_b.max())) + 1
            ma, mb = (_mcc_rows(labels[idx], p[idx], classes) for p in (pred_a, pred_b))
        else:
            ma, mb = (_spearman_rows(labels[idx], p[idx]) for p in (pred_a, pred_b))
        wins += float((ma > mb).sum() + 0.5 * (ma == mb).sum())
    return wins / rounds


# The probe head: pooler(x) = tanh(scale * (x - mean) / std), the scale and the regularisation (the k-mer
# baseline's grid, baseline.REGULARIZATION) chosen together on dev; on a tie the first scale. 0.5 squashes
# outlying features, 0.2 keeps them nearly linear; which fits better depends on the task: on the mean_wide
# probes of the --preset small models (examples/RESULTS.md) dev MCC was 0.5584 (0.5) / 0.6012 (0.2) on GUE
# mouse 0, but 0.5386 / 0.5184 on prom_core_tata and 0.7619 / 0.7602 on the species example. Not smaller: a
# sharper probe fits better but fine-tunes worse: on the species example, scale 0.1 with C up to 1e4
# (weights 10-100x larger) raised the probe's test MCC from 0.627 to 0.653, and LoRA fine-tuning from it
# then diverged (gradient norms ~600, dev MCC 0.44-0.56 in the first epochs).
PROBE_SCALES = (0.5, 0.2)
# "mean_wide"'s probe token layer: random ReLU features of each token's standardised states (their mean and
# std over the real tokens of the first TOKEN_STATS_ITEMS training items), bias uniform in [-1, 1], drawn
# from a fixed seed so that the probe depends on the model and the data only.
TOKEN_STATS_ITEMS = 1024
TOKEN_LAYER_SEED = 0


def training_device() -> torch.device:
    """The device the probe head's features and `train_lora`'s Trainer compute on: the GPU when there is one."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def fine_tune_bf16(device: torch.device) -> bool:
    """Whether `train_lora`'s Trainer runs under bf16 autocast on `device` (a CUDA device that supports it)."""
    return device.type == "cuda" and torch.cuda.is_bf16_supported()


def training_precision(device: torch.device):
    """The autocast context fine-tuning computes in on `device`. The probe head's features are computed in it
    too, so the probe is exactly the fine-tuning's epoch 0: the head itself computes in float32 either way
    (bert's `_head_precision`), but a bf16 encoder moved GUE mouse 0's float32-fitted probe from dev MCC
    0.6511 to 0.6479 (examples/RESULTS.md)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=fine_tune_bf16(device))


def token_layer_probe_state(model, dataset, codebook_sizes, batch_size: int = 64) -> dict:
    """{"token_layer.0.weight" [P, V * S], "token_layer.0.bias" [P]} (float32) of the probe's token layer:
    relu(R (x - mean) / std + b), R [P, V * S] ~ N(0, 1 / (V S)), b ~ U(-1, 1), over the concatenated states
    x of a window of V = config.classifier_window tokens (S = config.layers_size each; mean and std are a
    token's, repeated for each position of the window); P = config.classifier_width."""
    collate = ClassificationCollator(codebook_sizes)
    device = next(model.parameters()).device
    n = min(len(dataset), TOKEN_STATS_ITEMS)
    size = model.config.layers_size
    total, total_sq, count = torch.zeros(size, dtype=torch.float64), torch.zeros(size, dtype=torch.float64), 0
    was_training = model.training
    model.eval()
    with torch.no_grad(), training_precision(device):
        for i in range(0, n, batch_size):
            batch = collate([dataset[j] for j in range(i, min(i + batch_size, n))])
            # both strands in one encoder pass, as the model pools them (the collator pads them to one length)
            ids = torch.cat([batch["input_ids"], batch.get("rc_input_ids", batch["input_ids"][:0])])
            mask = torch.cat([batch["attention_mask"], batch.get("rc_attention_mask", batch["attention_mask"][:0])])
            out = model.vqdna(ids.to(device), mask.to(device), output_hidden_states=True, return_dict=True)
            x = torch.cat(out.hidden_states, dim=-1)[mask.to(device).bool()].double().cpu()
            total, total_sq, count = total + x.sum(0), total_sq + (x * x).sum(0), count + x.shape[0]
    model.train(was_training)
    mean = total / count
    std = (total_sq / count - mean * mean).clamp(min=0).sqrt().clamp(min=1e-6)
    window = model.config.classifier_window
    mean, std = mean.repeat(window), std.repeat(window)
    g = torch.Generator().manual_seed(TOKEN_LAYER_SEED)
    r = torch.randn(model.config.classifier_width, window * size, generator=g, dtype=torch.float64) / math.sqrt(window * size)
    b = torch.rand(model.config.classifier_width, generator=g, dtype=torch.float64) * 2 - 1
    weight = r / std
    return {"token_layer.0.weight": weight.float(), "token_layer.0.bias": (b - weight @ mean).float()}


def pooled_features(model, dataset, codebook_sizes, batch_size: int = 64) -> np.ndarray:
    """The head's input [n, config.pooled_size] (float64) for every item of `dataset`, the encoder in eval mode and
    in the fine-tuning's precision (`training_precision`)."""
    collate = ClassificationCollator(codebook_sizes)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = []
    with torch.no_grad(), training_precision(device):
        for i in range(0, len(dataset), batch_size):
            batch = collate([dataset[j] for j in range(i, min(i + batch_size, len(dataset)))])
            inputs = {k: v.to(device) for k, v in batch.items() if k != "labels"}
            out.append(model.pool(**inputs)[0].double().cpu())
    model.train(was_training)
    return torch.cat(out).numpy()


def probe_head(model, data, task: str, num_labels: int, batch_size: int = 64) -> dict:
    """Linear-probe initialisation of the head (LP-FT: Kumar et al. 2022, "Fine-Tuning can Distort
    Pretrained Features and Underperform Out-of-Distribution").

    With the pre-trained encoder frozen, the pooler is set to standardise its input over the training set,
    pooler(x) = tanh(scale (x - mean) / std), and the classifier is fitted on exactly those features
    by L2-regularised logistic regression (classification) or ridge regression (regression), the scale (of
    PROBE_SCALES) and the strength chosen together on dev. LoRA fine-tuning then starts from a head that already solves the task as well as the
    frozen features allow: a random head's first steps would push large, feature-distorting gradients
    into the adapters, and minibatch training of a head on mean-pooled features (nearly collinear: the
    task lives in their small directions) converges far more slowly than a full-batch fit.

    With "mean_wide" pooling the token layer is first set to random ReLU features of standardised token
    states (`token_layer_probe_state`), and x is their mean over tokens.

    Returns {"state": {token layer / pooler / classifier tensors}, "scale", "regularization", "dev", "test"} (metrics of the
    probe head alone, before any fine-tuning) and "dev_pred" (its dev `predictions`).
    """
    from vqdna.train.baseline import REGULARIZATION, choose_on_dev, linear_model

    device = training_device()
    model.to(device)
    token_state = {}
    if model.config.classifier_pooling == "mean_wide":
        token_state = token_layer_probe_state(model, data["train"], model.config.codebook_sizes, batch_size)
        model.load_state_dict(token_state, strict=False)
    feats = {split: pooled_features(model, data[split], model.config.codebook_sizes, batch_size) for split in SPLITS}
    model.to("cpu")
    mean = feats["train"].mean(0)
    std = np.maximum(feats["train"].std(0), 1e-6)
    standard = {split: (x - mean) / std for split, x in feats.items()}
    y = {split: data[split].labels.numpy() for split in SPLITS}
    metric = task_metrics(task)[0]
    hidden = mean.shape[0]

    def fit(pooled, reg):
        weight = np.zeros((num_labels, hidden))
        bias = np.zeros(num_labels)
        fitted = linear_model(task, reg).fit(pooled["train"], y["train"])
        if task == "classification":
            rows = fitted.classes_.astype(np.int64)
            if len(rows) == 2:  # sklearn's binary model has one row: split it into two opposite logits
                weight[rows] = np.stack([-fitted.coef_[0], fitted.coef_[0]]) / 2
                bias[rows] = np.array([-fitted.intercept_[0], fitted.intercept_[0]]) / 2
            else:
                weight[rows], bias[rows] = fitted.coef_, fitted.intercept_
            absent = np.setdiff1d(np.arange(num_labels), rows)
            bias[absent] = bias[rows].min() - 10.0  # a class never seen in training starts unlikely
        else:
            weight[0], bias[0] = fitted.coef_, fitted.intercept_
        logits = pooled["dev"] @ weight.T + bias
        dev = head_metrics(task, logits, y["dev"])
        return dev[metric], {"weight": weight, "bias": bias, "dev": dev, "dev_pred": predictions(task, logits)}

    choices = {}  # scale -> (regularization, best fit, the pooled features)
    for scale in PROBE_SCALES:
        pooled = {split: np.tanh(scale * x) for split, x in standard.items()}
        choices[scale] = (*choose_on_dev(f"the probe head (scale {scale:g})", REGULARIZATION,
                                         lambda reg, pooled=pooled: fit(pooled, reg)), pooled)
    scale = max(PROBE_SCALES, key=lambda s: choices[s][1]["dev"][metric])  # max keeps the first of equals
    regularization, best, pooled = choices[scale]
    state = {
        **token_state,
        "pooler.0.weight": torch.diag(torch.tensor(scale / std, dtype=torch.float32)),
        "pooler.0.bias": torch.tensor(-scale * mean / std, dtype=torch.float32),
        "classifier.weight": torch.tensor(best["weight"], dtype=torch.float32),
        "classifier.bias": torch.tensor(best["bias"], dtype=torch.float32),
    }
    test = head_metrics(task, pooled["test"] @ best["weight"].T + best["bias"], y["test"])
    spread = {"min": float(std.min()), "median": float(np.median(std)), "max": float(std.max())}
    return {"state": state, "scale": scale, "regularization": regularization, "feature_std": spread, "dev": best["dev"],
            "test": test, "dev_pred": best["dev_pred"]}


def head_metrics(task: str, logits: np.ndarray, labels: np.ndarray) -> dict:
    """task_metrics of logits [n, num_labels] (float64) plus "loss", the loss the model's forward computes
    (cross-entropy, or MSE for regression): the same keys Trainer's evaluation reports."""
    out = task_metrics(task)[1](logits, labels)
    if task == "classification":
        out["loss"] = float(torch.nn.functional.cross_entropy(torch.from_numpy(logits), torch.from_numpy(labels).long()))
    else:
        out["loss"] = float(np.mean((logits.reshape(-1) - labels) ** 2))
    return out


def apply_lora(model, r: int = 8, alpha: int = 16, dropout: float = 0.05, target_modules=None):
    """Wrap `model` with peft LoRA on its named target modules; pooler and classifier train in full,
    everything else is frozen. Raises ValueError when no module matches a target name."""
    from peft import LoraConfig, get_peft_model

    targets = list(target_modules or getattr(model, "lora_target_modules", ()))
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    matched = [n for n in names if n.split(".")[-1] in targets]
    if not targets or not matched:
        raise ValueError(f"LoRA target modules {targets} match no Linear module of {type(model).__name__} "
                         f"(its Linear modules end in: {sorted({n.split('.')[-1] for n in names})})")
    missing = [t for t in targets if not any(n.split(".")[-1] == t for n in names)]
    if missing:
        raise ValueError(f"LoRA target modules {missing} match no Linear module of {type(model).__name__}")
    cfg = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets,
                     modules_to_save=[m for m in HEAD_MODULES if hasattr(model, m)], bias="none")
    with warnings.catch_warnings():
        # peft reads transformers' deprecated `is_gradient_checkpointing` (a FutureWarning on every run)
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return get_peft_model(model, cfg)


def trainable_parameter_names(model) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]


def train_lora(model_dir, tok, data, task, num_labels, lr, epochs, batch_size, seed, out_dir, lora, weight_decay,
               head_state=None, dropout: float | None = None, head_config: dict | None = None, progress: bool = False):
    """One LoRA run; head_config: classifier config overrides (classifier_pooling, classifier_strands)."""
    from transformers import Trainer, TrainingArguments, set_seed

    from vqdna.models.bert import load_classifier

    from vqdna.train.pretrain import machine_args

    set_seed(seed)
    problem_type = "single_label_classification" if task == "classification" else "regression"
    overrides = {} if dropout is None else dict(hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout,
                                                 classifier_dropout=dropout)
    overrides.update(head_config or {})
    model = load_classifier(model_dir, num_labels=num_labels, problem_type=problem_type, **overrides)
    if head_state is not None:
        missing = set(head_state) - set(model.state_dict())
        if missing:
            raise ValueError(f"probe head parameters {sorted(missing)} are not in {type(model).__name__}")
        model.load_state_dict(head_state, strict=False)
    model = apply_lora(model, **lora)
    if head_state is not None:
        # The probe's pooler is a fixed standardisation. Trained, its off-diagonal entries (zero, moved by
        # AdamW at ~lr per step) mix features the head weighs by their small directions: on the species
        # example the dev MCC fell below the probe's with a trained pooler and rose above it frozen.
        # It stays in modules_to_save, so the adapter checkpoint still carries it; so does "mean_wide"'s
        # token layer, the probe's random features, frozen likewise (the probe's weights read those features).
        for name, p in model.named_parameters():
            if ".pooler." in name or ".token_layer." in name:
                p.requires_grad_(False)
    metric, fn = task_metrics(task)

    def compute_metrics(p):
        logits = p.predictions[0] if isinstance(p.predictions, tuple) else p.predictions
        return fn(np.asarray(logits, dtype=np.float64), np.asarray(p.label_ids))

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if batch_size % world:
        raise ValueError(f"global batch size {batch_size} is not divisible by the world size {world}")
    device = training_device()
    args = TrainingArguments(  # batch_size is global: the same optimisation whatever the GPU count
        output_dir=out_dir, num_train_epochs=epochs, per_device_train_batch_size=batch_size // world,
        per_device_eval_batch_size=max(batch_size, 64), learning_rate=lr, weight_decay=weight_decay,
        lr_scheduler_type="linear", warmup_steps=0.05, eval_strategy="epoch", save_strategy="epoch",
        save_total_limit=1, load_best_model_at_end=True, metric_for_best_model=metric, greater_is_better=True,
        logging_strategy="epoch", seed=seed, report_to="none", remove_unused_columns=False,
        disable_tqdm=not progress, **machine_args(fine_tune_bf16(device)),
    )
    trainer = Trainer(model=model, args=args, train_dataset=data["train"], eval_dataset=data["dev"],
                      data_collator=ClassificationCollator(tok.codebook_sizes), compute_metrics=compute_metrics)
    trainer.train()
    dev_out = trainer.predict(data["dev"], metric_key_prefix="dev")
    dev = dev_out.metrics
    test = trainer.evaluate(data["test"], metric_key_prefix="test")
    evals = [h for h in trainer.state.log_history if f"eval_{metric}" in h]
    best = max(evals, key=lambda h: h[f"eval_{metric}"])
    strip = lambda d, p: {k[len(p) + 1 :]: v for k, v in d.items() if k.startswith(p + "_") and "runtime" not in k
                          and "per_second" not in k}
    return model, {"lr": lr, "seed": seed, "best_epoch": round(best["epoch"]), "dev": strip(dev, "dev"),
                   "test": strip(test, "test"), "dev_by_epoch": [h[f"eval_{metric}"] for h in evals],
                   "dev_pred": predictions(task, dev_out.predictions[0] if isinstance(dev_out.predictions, tuple)
                                           else dev_out.predictions)}


def finetune(data_dir: str, model_dir: str, out_dir: str, lrs=(1e-5, 3e-5, 5e-5), epochs: int = 3,
             batch_size: int = 32, seeds=(0,), task: str = "auto", max_length: int | None = None,
             lora_r: int = 8, lora_alpha: int = 16, lora_dropout: float = 0.05, weight_decay: float = 0.01,
             tokenizer=None, head_init: str = "probe", dropout: float | None = 0.0, pooling: str | None = None,
             baseline_k: int | None = None, min_dev_confidence: float = 0.95, strands: str | None = None,
             window: int | None = None, progress: bool = False) -> dict:
    """Grid over learning rates (epochs chosen on dev) per seed; writes out_dir/results.json and returns
    it. model_dir: a pre-trained VQDNA model directory (with its tokenizer unless `tokenizer` is given).
    head_init: "probe" starts every run from the linear-probe head of `probe_head` (LP-FT), "random" from
    the usual random head. With the probe head, the probe itself is candidate "epoch 0" of the dev-based
    choice: a seed's chosen model is never worse on dev than the probe it started from (results.json:
    "chosen"[i]["source"] is "probe" or "finetuned"). The best fine-tuned (lr, epoch) on dev replaces the
    probe only when it beats it in at least min_dev_confidence of paired bootstrap resamples of dev
    (`dev_win_probability`, reported as "dev_win_probability"): a dev gain within the noise of a few hundred
    dev sequences is not a gain. On GUE prom_core_tata, fine-tuned runs 0.027-0.031 MCC above the probe on
    dev (613 sequences) were 0.020-0.038 below it on test. max_length (tokens incl. CLS/SEP; default: the
    longest sequence) truncates longer sequences.
    dropout: the model's hidden, attention and classifier dropout while fine-tuning (None keeps the pre-trained
    config's). It defaults to 0: the probe head is fitted on dropout-free features, and on the species example
    dropout 0.1 kept the training loss above ln 5 with the probe head and cost 0.05 test MCC after 3 epochs.
    pooling: the classifier's pooling (one of bert.POOLINGS; None keeps the pre-trained config's).
    strands: "forward" pools each sequence, "both" the mean over it and its reverse complement (None keeps the
    pre-trained config's): on GUE mouse 0 the probe's test MCC went 0.3385 -> 0.4277 with "both" (examples/RESULTS.md).
    window: "mean_wide"'s token layer reads this many consecutive tokens (config.classifier_window; None keeps the
    pre-trained config's).
    baseline_k: also fit the k-mer baseline of vqdna.train.baseline (None: none), reported as "baseline".
    progress: a progress bar per run (else one log line per epoch)."""
    from vqdna.data.alphabet import STRANDS
    from vqdna.models.bert import POOLINGS, VQDNAConfig, load_classifier
    from vqdna.models.hf_tokenizer import VQDNATokenizer

    if head_init not in ("probe", "random"):
        raise ValueError(f"head_init must be 'probe' or 'random', got {head_init!r}")
    if dropout is not None and not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
    if pooling is not None and pooling not in POOLINGS:
        raise ValueError(f"pooling must be {'|'.join(POOLINGS)} or None, got {pooling!r}")
    if strands is not None and strands not in STRANDS:
        raise ValueError(f"strands must be {'|'.join(STRANDS)} or None, got {strands!r}")
    if window is not None and window < 1:
        raise ValueError(f"window must be >= 1 or None, got {window!r}")
    if not 0.0 <= min_dev_confidence <= 1.0:
        raise ValueError(f"min_dev_confidence must be in [0, 1], got {min_dev_confidence!r}")
    tok = tokenizer or VQDNATokenizer.from_pretrained(model_dir)
    splits, task = load_task(data_dir, task)
    metric = task_metrics(task)[0]
    head = {} if pooling is None else {"classifier_pooling": pooling}  # config overrides of the classifier
    if strands is not None:
        head["classifier_strands"] = strands
    if window is not None:
        head["classifier_window"] = window
    pretrained = VQDNAConfig.from_pretrained(model_dir)
    used_strands = strands or pretrained.classifier_strands
    used_window = window or pretrained.classifier_window
    baseline = None
    if baseline_k is not None:  # it reads the strands the model reads: like for like
        from vqdna.train.baseline import kmer_baseline

        baseline = kmer_baseline(splits, task, k=baseline_k, strands=used_strands)
        log.warning("%d-mer baseline (%s strand%s, regularization %g): dev %s %.4f, test %.4f", baseline_k, used_strands,
                    "s" if used_strands == "both" else "", baseline["regularization"], metric, baseline["dev"][metric],
                    baseline["test"][metric])
    num_labels = int(splits["train"][1].max()) + 1 if task == "classification" else 1
    data = {split: encode_task(tok, seqs, labels, max_length - 2 if max_length else None, used_strands)
            for split, (seqs, labels) in splits.items()}
    lora = dict(r=lora_r, alpha=lora_alpha, dropout=lora_dropout)
    probe = None
    if head_init == "probe":
        base = load_classifier(model_dir, num_labels=num_labels, **head)
        probe = probe_head(base, data, task, num_labels, batch_size=max(batch_size, 64))
        if base.config.classifier_pooling == "cls":
            # Measured on the test suite's bert-tiny (test_finetune.py::test_cls_probe_is_what_lora_steps_swamp): CLS features vary ~8x
            # less between sequences than token means, the probe scales them up by as much, and LoRA at lr 5e-4
            # then threw the training loss above chance (gradient norms ~120) where mean pooling stayed below 1.
            log.warning("the probe head reads the CLS token, which masked-LM pre-training never trains (feature "
                        "std median %.3g): LoRA steps can swamp it; --pooling mean_layers or mean fine-tunes stably",
                        probe["feature_std"]["median"])
        del base
        log.warning("probe head (scale %g, regularization %g): dev %s %.4f, test %.4f", probe["scale"],
                    probe["regularization"], metric, probe["dev"][metric], probe["test"][metric])
    runs, chosen = [], []
    for seed in seeds:
        per_seed = []
        for lr in lrs:
            run_dir = os.path.join(out_dir, "runs", f"seed{seed}-lr{lr:g}")
            _, res = train_lora(model_dir, tok, data, task, num_labels, lr, epochs, batch_size, seed, run_dir, lora, weight_decay,
                                head_state=probe["state"] if probe else None, dropout=dropout, head_config=head,
                                progress=progress)
            log.warning("seed %d lr %g: dev %s %.4f (epoch %d), test %.4f", seed, lr, metric, res["dev"][metric],
                        res["best_epoch"], res["test"][metric])
            per_seed.append({"source": "finetuned", **res})
        # The probe is every run's epoch 0; fine-tuning must beat it on dev beyond the dev set's noise.
        best = dict(max(per_seed, key=lambda r: r["dev"][metric]))
        if probe:
            win = dev_win_probability(task, data["dev"].labels.numpy(), best["dev_pred"], probe["dev_pred"], seed=seed)
            if not (best["dev"][metric] > probe["dev"][metric] and win >= min_dev_confidence):
                best = {"source": "probe", "lr": None, "seed": seed, "best_epoch": 0, "dev": probe["dev"],
                        "test": probe["test"]}
            best["dev_win_probability"] = win  # of the best fine-tuned run over the probe
        chosen.append({k: v for k, v in best.items() if k != "dev_pred"})
        for r in per_seed:
            r.pop("dev_pred", None)
        runs += per_seed
    summary = summarize_seeds(chosen)
    result = {"task": task, "metric": metric, "data": os.path.abspath(data_dir), "model": os.path.abspath(model_dir),
              "tokenizer_sha256": tok.tokenizer_sha256, "num_labels": num_labels,
              "sizes": {s: len(d) for s, d in data.items()}, "lora": lora, "lrs": list(lrs), "epochs": epochs,
              "batch_size": batch_size, "seeds": list(seeds), "head_init": head_init, "dropout": dropout,
              "min_dev_confidence": min_dev_confidence,
              "pooling": pooling, "strands": used_strands, "window": used_window, "probe": {k: v for k, v in probe.items() if k not in ("state", "dev_pred")} if probe else None,
              "baseline": baseline, "test": summary, "chosen": chosen, "runs": runs,
              "runtime": {"torch_threads": torch.get_num_threads(), "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY")}}
    os.makedirs(out_dir, exist_ok=True)
    if probe is not None:  # a seed may report the probe head itself: keep it (its head's tensors)
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in probe["state"].items()}, os.path.join(out_dir, "probe_head.safetensors"))
        result["probe"]["state_file"] = "probe_head.safetensors"
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(result, f, indent=2, default=lambda x: None if isinstance(x, float) and math.isnan(x) else x)
    return result


def summarize_seeds(chosen: list[dict]) -> dict:
    """{metric: {"mean", "std"}} over the seeds' chosen models' test metrics: the sample standard deviation
    (ddof 1, the spread a reader expects from "mean ± sd over 3 seeds"), 0 for one seed."""
    summary = {}
    for key in chosen[0]["test"]:
        vals = [c["test"][key] for c in chosen]
        summary[key] = {"mean": float(np.mean(vals)), "std": float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0}
    return summary


def format_results(res: dict) -> str:
    """A results.json (as `finetune` returns it) as a plain-text table: the model (mean ± std over seeds,
    what was chosen per seed), its probe head alone and the k-mer baseline, test metrics."""
    m = res["metric"]
    keys = [m] + sorted(k for k in res["test"] if k not in (m, "loss"))
    rows = [("VQDNA + LoRA" if res["head_init"] == "random" else "VQDNA (LoRA from the probe head)",
             {k: f"{v['mean']:.4f} ± {v['std']:.4f}" for k, v in res["test"].items()},
             "; ".join(f"seed {c['seed']}: " + ("the probe head (epoch 0)" if c["source"] == "probe"
                                              else f"lr {c['lr']:g} epoch {c['best_epoch']}")
                       + f", dev {c['dev'][m]:.4f}"
                       + (f", P(beats probe) {c['dev_win_probability']:.2f}" if "dev_win_probability" in c else "")
                       for c in res["chosen"]))]
    if res.get("probe"):
        p = res["probe"]
        rows.append(("its linear-probe head alone", {k: f"{p['test'][k]:.4f}" for k in keys},
                     f"C {p['regularization']:g}, dev {p['dev'][m]:.4f}"))
    if res.get("baseline"):
        b = res["baseline"]
        strands = " (both strands)" if b.get("strands") == "both" else ""
        rows.append((f"{b['k']}-mer frequencies{strands} + {'logistic' if res['task'] == 'classification' else 'ridge'} regression",
                     {k: f"{b['test'][k]:.4f}" for k in keys}, f"C {b['regularization']:g}, dev {b['dev'][m]:.4f}"))
    header = ["model"] + [f"test {k}" for k in keys] + ["chosen on dev"]
    table = [header] + [[name] + [vals.get(k, "") for k in keys] + [note] for name, vals, note in rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(header) - 1)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1] for r in table)
