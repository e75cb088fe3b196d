#!/usr/bin/env bash
# The CPU recipe from the command line alone: `--preset small` pre-training and fine-tuning on one task.
#   examples/small_preset.sh TASK OUT [FASTA ...]
# TASK: a GUE-format folder (train.csv, dev.csv, test.csv: sequence,label). The masked LM is pre-trained on
# the task's train sequences (labels dropped) plus the FASTA files given (for example a genome slice), with
# the bundled vqdna-small tokenizer; then LoRA fine-tuning from the linear-probe head, beside the built-in
# 6-mer baseline, over the seeds in SEEDS (default 0,1,2: mean and spread in OUT/finetune/results.json).
# Examples (DATA_ROOT: docs/data.md):
#   examples/small_preset.sh DATA_ROOT/gue/prom/prom_core_tata runs/tata DATA_ROOT/genomes/human_chr17_hg19_part.fa
#   python examples/species/run.py --genomes DATA_ROOT/genomes --out runs/species --prepare-only
#   examples/small_preset.sh runs/species/task runs/species runs/species/pretrain.fa
# PY (default .venv/bin/python), SEEDS, PRETRAIN_SEED (default 0) and EXTRA_PRETRAIN / EXTRA_FINETUNE
# (more flags) change the run; every step's time goes to OUT/times.txt.
set -euo pipefail
if [ $# -lt 2 ]; then
    echo "usage: $0 TASK OUT [FASTA ...]" >&2
    exit 2
fi
TASK=$1; OUT=$2; shift 2
PY=${PY:-.venv/bin/python}
mkdir -p "$OUT"
step() {  # step NAME COMMAND...: runs it, appends its wall time to OUT/times.txt
    local name=$1 t0; shift; t0=$(date +%s)
    "$@"
    echo "$name $(( $(date +%s) - t0 )) s" | tee -a "$OUT/times.txt"
}
"$PY" - "$TASK/train.csv" "$OUT/train_seqs.fa" <<'PYEOF'
import csv, sys
with open(sys.argv[1]) as f, open(sys.argv[2], "w") as out:
    for i, row in enumerate(csv.DictReader(f)):
        out.write(f">train{i}\n{row['sequence']}\n")
PYEOF
step tokenize "$PY" -m vqdna.cli tokenize "$OUT/train_seqs.fa" "$@" --out "$OUT/tokens" --no-progress
step pretrain "$PY" -m vqdna.cli pretrain --tokens "$OUT/tokens" --out "$OUT/mlm" --preset small \
    --seed "${PRETRAIN_SEED:-0}" --no-progress ${EXTRA_PRETRAIN:-}
step finetune "$PY" -m vqdna.cli finetune --data "$TASK" --model "$OUT/mlm" --out "$OUT/finetune" --preset small \
    --seeds "${SEEDS:-0,1,2}" --no-progress ${EXTRA_FINETUNE:-}
