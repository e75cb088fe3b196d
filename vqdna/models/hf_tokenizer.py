"""VQDNATokenizer: DNA strings -> code ids per level for the stage-2/3 models (transformers convention).

`tok(["ACGT...", ...], padding=True, truncation=True, max_length=256, return_tensors="pt")` returns a
transformers BatchEncoding with input_ids [B, L, n_levels] int64 (CLS, one code per base, SEP, then
PAD; special ids as in vqdna.models.bert) and attention_mask [B, L] int64. Codes come from the stage-1
VQDNATokenizerModel's `encode` (the fast kernels), which it owns and saves inside its directory.
"""

from __future__ import annotations

import json
import os

import numpy as np
import torch

from vqdna.data.alphabet import BYTE_TO_ID, ID_COMPLEMENT, INVALID, NUM_BASES, PAD, SKIP, STRANDS

# Importing the models registers model_type "vqdna" with the transformers Auto classes, so the model a
# VQDNATokenizer is saved beside loads with AutoModel* (no trust_remote_code) once a tokenizer exists.
from vqdna.models.bert import build_inputs, special_ids  # noqa: E402

CONFIG_NAME = "vqdna_tokenizer.json"
MODEL_SUBDIR = "stage1_tokenizer"


def dna_to_ids(seq: str | bytes, name: str = "sequence") -> np.ndarray:
    """A DNA string -> uint8 base ids 0..4 (docs/design.md §1 alphabet; whitespace dropped). A byte that is no
    IUPAC letter raises ValueError naming `name` and the position."""
    raw = np.frombuffer(seq.encode("ascii", errors="replace") if isinstance(seq, str) else bytes(seq), np.uint8)
    ids = BYTE_TO_ID[raw]
    bad = np.flatnonzero(ids == INVALID)
    if bad.size:
        raise ValueError(f"{name}, position {bad[0]}: {chr(raw[bad[0]])!r} is not an IUPAC nucleotide letter")
    return ids[ids != SKIP]


class VQDNATokenizer:
    """Tokenizer for VQDNAForMaskedLM / VQDNAForSequenceClassification around a stage-1 tokenizer model.

    model: a VQDNATokenizerModel (put in eval mode; its device is used); model_max_length: the default
    max_length (tokens, CLS and SEP included); batch_size: sequences per encode call.
    """

    def __init__(self, model, model_max_length: int = 256, batch_size: int = 64):
        self.model = model.eval()
        self.model_max_length = int(model_max_length)
        self.batch_size = int(batch_size)

    # -- vocabulary ------------------------------------------------------------------------------
    @property
    def codebook_sizes(self) -> list[int]:
        return [int(k) for k in self.model.config.codebook_sizes]

    @property
    def n_levels(self) -> int:
        return len(self.codebook_sizes)

    @property
    def tokenizer_sha256(self):
        return self.model.tokenizer_sha256

    def _special(self, token: int) -> list[int]:
        return special_ids(self.codebook_sizes, token)

    @property
    def pad_token_id(self) -> list[int]:
        """Per-level ids of [PAD] (likewise cls/sep/mask_token_id)."""
        return self._special(0)

    @property
    def cls_token_id(self) -> list[int]:
        return self._special(1)

    @property
    def sep_token_id(self) -> list[int]:
        return self._special(2)

    @property
    def mask_token_id(self) -> list[int]:
        return self._special(3)

    # -- encoding --------------------------------------------------------------------------------
    def encode_codes(self, sequences, max_bases: int | None = None) -> list[torch.Tensor]:
        """DNA strings -> one int64 [n_i, n_levels] code tensor per string (no special tokens), each
        cut to its first max_bases bases. Sequences are encoded in length-sorted padded batches
        (a padded record encodes exactly as alone)."""
        return self._encode_ids(self._base_ids(sequences, max_bases))

    def encode_reverse_complement_codes(self, sequences, max_bases: int | None = None) -> list[torch.Tensor]:
        """encode_codes of the other strand of what encode_codes(sequences, max_bases) encodes: the reverse
        complement of each string's first max_bases bases, [n_i, n_levels] each."""
        return self._encode_ids([ID_COMPLEMENT[x[::-1]] for x in self._base_ids(sequences, max_bases)])

    @staticmethod
    def _base_ids(sequences, max_bases):
        ids = [dna_to_ids(s, f"sequence {i}") for i, s in enumerate(sequences)]
        return ids if max_bases is None else [x[:max_bases] for x in ids]

    def _encode_ids(self, ids) -> list[torch.Tensor]:
        device = next(self.model.parameters()).device
        out: list[torch.Tensor | None] = [None] * len(ids)
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        for start in range(0, len(order), self.batch_size):
            chunk = order[start : start + self.batch_size]
            width = max(1, max(len(ids[i]) for i in chunk))
            batch = torch.full((len(chunk), width), PAD, dtype=torch.long)
            for row, i in enumerate(chunk):
                batch[row, : len(ids[i])] = torch.from_numpy(ids[i].astype(np.int64))
            codes = self.model.encode(batch.to(device), batch.to(device) < NUM_BASES).long().cpu()
            for row, i in enumerate(chunk):
                out[i] = codes[row, : len(ids[i])]
        return out

    def pad(self, codes_list, padding=True, max_length=None, return_tensors="pt"):
        """Codes [n_i, n_levels] per sequence -> BatchEncoding (CLS/SEP added, right padding)."""
        from transformers import BatchEncoding

        pad_to = max_length if padding == "max_length" else None
        if not padding or padding == "do_not_pad":
            lengths = {c.shape[0] for c in codes_list}
            if return_tensors == "pt" and len(lengths) > 1:
                raise ValueError("sequences have different lengths; pass padding=True to return tensors")
        input_ids, mask = build_inputs(codes_list, self.codebook_sizes, pad_to=pad_to)
        if return_tensors == "pt":
            return BatchEncoding({"input_ids": input_ids, "attention_mask": mask}, tensor_type=None)
        if return_tensors is not None:
            raise ValueError(f"return_tensors must be 'pt' or None, got {return_tensors!r}")
        n = [c.shape[0] + 2 for c in codes_list]
        return BatchEncoding({"input_ids": [input_ids[i, : n[i]].tolist() for i in range(len(n))],
                              "attention_mask": [mask[i, : n[i]].tolist() for i in range(len(n))]})

    def __call__(self, text, padding=False, truncation=False, max_length=None, return_tensors=None,
                 strands="forward"):
        """text: a DNA string or a list of them. max_length counts CLS and SEP; truncation keeps the
        first max_length - 2 bases (max_length defaults to model_max_length when truncating).
        strands="both" also returns rc_input_ids and rc_attention_mask: the reverse complements of the
        kept bases, padded as input_ids (what a classifier with classifier_strands "both" reads)."""
        if strands not in STRANDS:
            raise ValueError(f"strands must be {'|'.join(STRANDS)}, got {strands!r}")
        single = isinstance(text, (str, bytes))
        seqs = [text] if single else list(text)
        if max_length is None and (truncation or padding == "max_length"):
            max_length = self.model_max_length
        if max_length is not None and max_length < 3:
            raise ValueError(f"max_length must leave room for CLS, one base and SEP, got {max_length}")
        keep = max_length - 2 if truncation and max_length else None
        codes = self.encode_codes(seqs, keep)
        if strands == "both":  # one padded batch of both strands: the halves get one length
            codes += self.encode_reverse_complement_codes(seqs, keep)
        enc = self.pad(codes, padding=padding, max_length=max_length, return_tensors=return_tensors)
        if strands == "both":
            n = len(seqs)
            enc = type(enc)({**{k: v[:n] for k, v in enc.items()}, **{"rc_" + k: v[n:] for k, v in enc.items()}})
        if single and return_tensors is None:
            enc = type(enc)({k: v[0] for k, v in enc.items()})
        return enc

    # -- persistence -----------------------------------------------------------------------------
    def save_pretrained(self, save_directory) -> None:
        """Writes vqdna_tokenizer.json and the stage-1 model (config.json + model.safetensors) under
        save_directory/stage1_tokenizer/."""
        os.makedirs(save_directory, exist_ok=True)
        self.model.save_pretrained(os.path.join(save_directory, MODEL_SUBDIR))
        meta = {
            "tokenizer_class": type(self).__name__,
            "model_max_length": self.model_max_length,
            "codebook_sizes": self.codebook_sizes,
            "tokenizer_sha256": self.tokenizer_sha256,
            "stage1_model": MODEL_SUBDIR,
        }
        with open(os.path.join(save_directory, CONFIG_NAME), "w") as f:
            json.dump(meta, f, indent=2)

    @classmethod
    def from_pretrained(cls, name_or_path, **kwargs) -> "VQDNATokenizer":
        """A directory written by save_pretrained, a stage-1 tokenizer directory, or a bundled
        tokenizer name ("vqdna-small")."""
        from vqdna.models.tokenizer_model import VQDNATokenizerModel

        path = os.fspath(name_or_path)
        meta_path = os.path.join(path, CONFIG_NAME)
        if os.path.isfile(meta_path):
            with open(meta_path) as f:
                meta = json.load(f)
            model = VQDNATokenizerModel.from_pretrained(os.path.join(path, meta["stage1_model"]))
            if meta.get("tokenizer_sha256") and model.tokenizer_sha256 != meta["tokenizer_sha256"]:
                raise ValueError(f"{path}: stage-1 weights sha256 {model.tokenizer_sha256} differs from the "
                                 f"recorded {meta['tokenizer_sha256']} (files replaced?)")
            kwargs.setdefault("model_max_length", meta.get("model_max_length", 256))
            return cls(model, **kwargs)
        return cls(VQDNATokenizerModel.from_pretrained(path), **kwargs)
