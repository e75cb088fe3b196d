"""Run under torchrun by test_onthefly.test_two_gloo_ranks_draw_disjoint_reproducible_windows: a 2-step
on-the-fly pre-training that records the numbers of the windows this rank encoded (in order) in
OUT/windows-RANK.json. argv: FASTA OUT."""

import json
import os
import sys

import torch

from tests.train import _mlm
from vqdna.data import SequenceIndex
from vqdna.train import onthefly
from vqdna.train.pretrain import pretrain

fasta, out = sys.argv[1], sys.argv[2]
torch.set_num_threads(1)
seen = []
encode = onthefly.OnTheFlyEncoder.__call__


def recording(self, items):
    seen.extend(int(it.number) for it in items)
    return encode(self, items)


onthefly.OnTheFlyEncoder.__call__ = recording
index = SequenceIndex.build([fasta], cache=os.path.join(out, "cache"))
pretrain(index, _mlm.tokenizer(), os.path.join(out, "mlm"), config="bert-tiny", steps=2, batch_size=8, max_length=32,
         lr=2e-3, warmup_steps=1, save_steps=100, resume=False, extra_args={"disable_tqdm": True})
with open(os.path.join(out, f"windows-{os.environ['RANK']}.json"), "w") as f:
    json.dump(seen, f)
