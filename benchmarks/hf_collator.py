"""Linepack packing + corruption vs Hugging Face's ``DataCollatorForLanguageModeling``, in one process.

    python benchmarks/hf_collator.py [--batches 200] [--hf-batches 20] [--repeats 7] [--quick]

Block 1024, 64 rows per batch, 80/10/10, tinyshakespeare (``data/tinyshakespeare.txt``, shipped
with the repository), two masking policies:

- ``bert``: each candidate supervised with probability 0.15.
- ``uniform``: per row ``r ~ U(0, 1)``. ``DataCollatorForLanguageModeling`` only takes one scalar
  ``mlm_probability`` (transformers 5.x), so its side is :class:`PerRowUniformCollator`: the
  collator with its ``*_mask_tokens`` methods copied op for op except that the Bernoulli
  probability is ``r`` per row (a Bernoulli count around ``r * n``; Linepack draws exactly
  ``round(r * n)``, which costs it a sort).

Paths, all on the same rows:

- ``linepack pack+corrupt``: ``BatchStream.train_batches()`` — packing from the corpus *and*
  corruption, wire dtypes out (uint16/int16/uint8).
- ``linepack corrupt``: the policy's ``select`` + ``corrupt`` + ``mask_ratio`` on pre-packed rows,
  i.e. exactly the work the collator does.
- ``hf <input> -> <return_tensors>``: the collator fed the same pre-packed rows, uncorrupted,
  with ``attention_mask`` and a precomputed ``special_tokens_mask`` (1 at [SEP] and [PAD]), so it
  never calls the tokenizer per row — the fast path its docs recommend. Rows come as Python lists
  (what ``datasets`` yields by default), numpy arrays or torch tensors; ``return_tensors`` "pt"
  (its default, what ``Trainer`` uses) or "np". All rows have length 1024, so nothing is padded.

Tokens are rows x 1024. Times are CPU seconds of this process, best of ``--repeats`` timed runs
(torch limited to one thread, so CPU time is the cost of one core, like the single-threaded
producer): on a shared host the best run is the closest to the true cost. Prints JSON.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from producer.corpus import load_corpus  # noqa: E402
from producer.corruption import corrupt, mask_ratio  # noqa: E402
from producer.selection import select  # noqa: E402
from producer.stream import BatchStream  # noqa: E402
from shared.data_config import DataConfig  # noqa: E402
from shared.tokenizer import CharTokenizer  # noqa: E402
from shared.vocab import IGNORE_INDEX  # noqa: E402

SHAKESPEARE = Path(__file__).resolve().parents[1] / "data" / "tinyshakespeare.txt"  # shipped: data/README.md
BLOCK_SIZE, ROWS = 1024, 64
POOL = 8  # distinct pre-packed batches the collator paths cycle through
INPUT_KINDS = ("list", "numpy", "torch")


def hf_tokenizer(vocabulary: CharTokenizer):
    """A fast character-level tokenizer whose ids are Linepack's (base chars, [MASK], [SEP], [PAD])."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    ids = {char: i for i, char in enumerate(vocabulary.decode(np.arange(vocabulary.base_size)))}
    ids.update({"[MASK]": vocabulary.mask_id, "[SEP]": vocabulary.sep_id, "[PAD]": vocabulary.pad_id})
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(WordLevel(ids, unk_token="[PAD]")), mask_token="[MASK]", sep_token="[SEP]", pad_token="[PAD]"
    )
    ids = (tokenizer.mask_token_id, tokenizer.pad_token_id, len(tokenizer))
    assert ids == (vocabulary.mask_id, vocabulary.pad_id, vocabulary.vocab_size)
    return tokenizer


def hf_collator(tokenizer, policy: str, return_tensors: str):
    from transformers import DataCollatorForLanguageModeling

    class PerRowUniformCollator(DataCollatorForLanguageModeling):
        """The collator with a per-row mask probability ``r ~ U(0, 1)``; every other op is the parent's."""

        def torch_mask_tokens(self, inputs, special_tokens_mask=None, offset_mapping=None):
            labels = inputs.clone()
            probability_matrix = torch.rand(labels.shape[0], 1).expand(labels.shape).clone()
            probability_matrix.masked_fill_(special_tokens_mask.bool(), value=0.0)
            masked_indices = torch.bernoulli(probability_matrix).bool()
            labels[~masked_indices] = -100
            replaced = torch.bernoulli(torch.full(labels.shape, self.mask_replace_prob)).bool() & masked_indices
            inputs[replaced] = self.tokenizer.mask_token_id
            scaled = self.random_replace_prob / (1 - self.mask_replace_prob)
            random = torch.bernoulli(torch.full(labels.shape, scaled)).bool() & masked_indices & ~replaced
            random_words = torch.randint(len(self.tokenizer), labels.shape, dtype=torch.long)
            inputs[random] = random_words[random]
            return inputs, labels

        def numpy_mask_tokens(self, inputs, special_tokens_mask=None, offset_mapping=None):
            labels = np.copy(inputs)
            probability_matrix = np.full(labels.shape, np.random.random((labels.shape[0], 1)))
            probability_matrix[special_tokens_mask.astype(bool)] = 0
            masked_indices = np.random.binomial(1, probability_matrix, size=probability_matrix.shape).astype(bool)
            labels[~masked_indices] = -100
            replaced = np.random.binomial(1, self.mask_replace_prob, size=labels.shape).astype(bool) & masked_indices
            inputs[replaced] = self.tokenizer.mask_token_id
            scaled = self.random_replace_prob / (1 - self.mask_replace_prob)
            random = np.random.binomial(1, scaled, size=labels.shape).astype(bool) & masked_indices & ~replaced
            inputs[random] = np.random.randint(low=0, high=len(self.tokenizer), size=np.count_nonzero(random), dtype=np.int64)
            return inputs, labels

    if policy == "bert":
        return DataCollatorForLanguageModeling(tokenizer, mlm_probability=0.15, return_tensors=return_tensors)
    # mlm_probability is only validated by the parent; the per-row draw replaces it.
    return PerRowUniformCollator(tokenizer, mlm_probability=0.5, return_tensors=return_tensors)


def prepacked(batch: dict[str, np.ndarray], base_size: int) -> dict[str, np.ndarray]:
    """The uncorrupted rows of a Linepack batch (int64), its attention mask and special-tokens mask."""
    x = np.where(batch["y"] != IGNORE_INDEX, batch["y"], batch["x"]).astype(np.int64)
    return {"input_ids": x, "attention_mask": batch["attention_mask"].astype(np.int64),
            "special_tokens_mask": (x >= base_size).astype(np.int64)}


def examples(rows: dict[str, np.ndarray], kind: str) -> list[dict]:
    """The rows as the per-example dicts a Dataset hands the collator."""
    convert = {"list": lambda a: a.tolist(), "numpy": lambda a: a, "torch": torch.from_numpy}[kind]
    return [{name: convert(array[i]) for name, array in rows.items()} for i in range(len(rows["input_ids"]))]


def best_rate(make_batch, batches: int, repeats: int) -> dict:
    """Tokens/s of ``make_batch()`` over the best of ``repeats`` timed runs of ``batches`` calls."""
    make_batch()  # warm-up
    best_cpu = best_wall = math.inf
    for _ in range(repeats):
        cpu, wall = time.process_time(), time.perf_counter()
        for _ in range(batches):
            make_batch()
        best_cpu = min(best_cpu, time.process_time() - cpu)
        best_wall = min(best_wall, time.perf_counter() - wall)
    tokens = batches * ROWS * BLOCK_SIZE
    return {"M_tokens_per_s_cpu": round(tokens / best_cpu / 1e6, 2), "M_tokens_per_s_wall": round(tokens / best_wall / 1e6, 2),
            "ms_per_batch_cpu": round(1e3 * best_cpu / batches, 3)}


def bench_policy(policy: str, corpus, args) -> dict:
    config = DataConfig(corpus=args.corpus, block_size=BLOCK_SIZE, rows_per_message=ROWS, policy=policy)
    stream = BatchStream(config, corpus=corpus)
    vocabulary = stream.tokenizer
    stream_batches = stream.train_batches()
    pool = [prepacked(next(stream_batches), vocabulary.base_size) for _ in range(POOL)]
    results = {"linepack pack+corrupt": best_rate(lambda: next(stream_batches), args.batches, args.repeats)}

    rng = np.random.default_rng(0)
    turn = itertools.count()

    def linepack_corrupt():
        rows = pool[next(turn) % POOL]
        x = rows["input_ids"].astype(np.uint16)
        n_candidates = rows["attention_mask"].sum(axis=1) - 1
        selection = select(stream.corruption.policy, rng, n_candidates, BLOCK_SIZE, "train")
        y = corrupt(rng, x, selection, config.mask_fractions, vocabulary.base_size, vocabulary.mask_id)
        return x, y, mask_ratio(selection.supervised, n_candidates)

    results["linepack corrupt"] = best_rate(linepack_corrupt, args.batches, args.repeats)

    tokenizer = hf_tokenizer(vocabulary)
    for return_tensors in ("pt", "np"):
        collator = hf_collator(tokenizer, policy, return_tensors)
        for kind in INPUT_KINDS:
            inputs = [examples(rows, kind) for rows in pool]
            results[f"hf {kind} -> {return_tensors}"] = best_rate(
                lambda c=collator, e=inputs: c(e[next(turn) % POOL]), args.hf_batches, args.repeats)

    check_outputs(tokenizer, policy, pool[0])
    fastest_hf = max((name for name in results if name.startswith("hf ")), key=lambda n: results[n]["M_tokens_per_s_cpu"])
    rate = {name: row["M_tokens_per_s_cpu"] for name, row in results.items()}
    return {
        "policy": policy,
        "paths": results,
        "fastest_hf_path": fastest_hf,
        "ratio_pack_corrupt_vs_fastest_hf": round(rate["linepack pack+corrupt"] / rate[fastest_hf], 1),
        "ratio_pack_corrupt_vs_hf_default_pt": round(rate["linepack pack+corrupt"] / rate["hf list -> pt"], 1),
        "ratio_corrupt_vs_fastest_hf": round(rate["linepack corrupt"] / rate[fastest_hf], 1),
    }


def check_outputs(tokenizer, policy: str, rows: dict[str, np.ndarray]) -> None:
    """The collator does the same job: right shape, never [SEP]/[PAD] supervised, about 15 %
    supervised (bert) or per-row ratios spread over (0, 1) (uniform)."""
    candidates = rows["attention_mask"].sum(axis=1) - 1
    for return_tensors in ("pt", "np"):
        labels = np.asarray(hf_collator(tokenizer, policy, return_tensors)(examples(rows, "list"))["labels"])
        supervised = labels != IGNORE_INDEX
        assert labels.shape == (ROWS, BLOCK_SIZE) and not supervised[rows["special_tokens_mask"] == 1].any()
        ratios = supervised.sum(axis=1) / candidates
        if policy == "bert":
            assert 0.12 < supervised.sum() / candidates.sum() < 0.18, ratios
        else:
            assert np.percentile(ratios, 90) - np.percentile(ratios, 10) > 0.5, ratios


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, default=200, help="batches per timed run, Linepack paths")
    parser.add_argument("--hf-batches", type=int, default=20, help="batches per timed run, collator paths")
    parser.add_argument("--repeats", type=int, default=7, help="timed runs per path; the best is reported")
    parser.add_argument("--quick", action="store_true", help="a few batches per path (smoke test)")
    parser.add_argument("--corpus", default=str(SHAKESPEARE))
    args = parser.parse_args()
    if args.quick:
        args.batches, args.hf_batches, args.repeats = 3, 1, 1
    import transformers

    torch.set_num_threads(1)
    corpus = load_corpus(args.corpus)
    load_before = os.getloadavg()
    policies = [bench_policy(policy, corpus, args) for policy in ("bert", "uniform")]
    print(json.dumps({
        "corpus": corpus.name, "block_size": BLOCK_SIZE, "rows": ROWS, "transformers": transformers.__version__,
        "torch": torch.__version__, "numpy": np.__version__, "timing": f"CPU seconds, best of {args.repeats}, torch 1 thread",
        "cpus": os.cpu_count(), "load_average_before": load_before, "load_average_after": os.getloadavg(), "policies": policies,
    }, indent=1))


if __name__ == "__main__":
    main()
