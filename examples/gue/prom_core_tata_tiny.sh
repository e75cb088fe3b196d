#!/usr/bin/env bash
# A quick CPU run of all three stages on GUE prom_core_tata (tiny model; NOT the paper's set-up):
# label-free pre-training on the task's train sequences + the human chr17 slice, then LoRA fine-tuning.
#   examples/gue/prom_core_tata_tiny.sh TOKENIZER OUT DATA_ROOT
# DATA_ROOT holds gue/prom/prom_core_tata/{train,dev,test}.csv and genomes/human_chr17_hg19_part.fa
# (docs/data.md: where to fetch them, their checksums). TOKENIZER: a directory or a bundled name (vqdna-small).
# STEPS, LRS, EPOCHS override the pre-training steps, the fine-tuning learning rates and epochs.
set -euo pipefail
if [ $# -ne 3 ]; then
    echo "usage: $0 TOKENIZER OUT DATA_ROOT  (DATA_ROOT: see docs/data.md)" >&2
    exit 2
fi
TOK=$1; OUT=$2; ROOT=$3
PY=${PY:-.venv/bin/python}
TASK=$ROOT/gue/prom/prom_core_tata
mkdir -p "$OUT"
# train sequences (labels dropped) as FASTA for the pre-training corpus
$PY - "$TASK/train.csv" "$OUT/train_seqs.fa" <<'PYEOF'
import csv, sys
with open(sys.argv[1]) as f, open(sys.argv[2], "w") as out:
    for i, row in enumerate(csv.DictReader(f)):
        out.write(f">train{i}\n{row['sequence']}\n")
PYEOF
$PY -m vqdna.cli tokenize "$OUT/train_seqs.fa" "$ROOT/genomes/human_chr17_hg19_part.fa" --out "$OUT/tokens" --model "$TOK" --no-progress
$PY -m vqdna.cli pretrain --tokens "$OUT/tokens" --tokenizer "$TOK" --config bert-tiny --out "$OUT/mlm" \
    --steps ${STEPS:-200} --batch-size 32 --max-length 128 --lr 1e-3 --warmup-steps 20 --logging-steps 25 --save-steps 100
$PY -m vqdna.cli finetune --data "$TASK" --model "$OUT/mlm" --out "$OUT/finetune" --lrs ${LRS:-1e-3,3e-3} \
    --epochs ${EPOCHS:-3} --batch-size 32
