"""Train a Hugging Face masked LM on a Linepack stream, with its diagnostics (docs/API.md).

    pip install -e .[hf]
    python examples/hf_masked_lm.py --corpus data/tinyshakespeare.txt --max-steps 300 --http-port 8000

Starts its own producer (``python -m producer run --connect ...``, its log in a temporary file),
builds a ``transformers`` masked LM (ModernBERT, or ``--model bert``) from a config (no hub download: the vocabulary size, the
block size and ``[PAD]`` come from the stream), trains it with a plain loop (``--loop plain``)
or Hugging Face's ``Trainer`` (``--loop hf``), evaluates it on the stream's fixed val set every
``--eval-every`` steps and at the end, and reports both losses to the diagnostics server
(``curl localhost:PORT/diagnostics``: its loss, the context-free floor, the stream; the page at
``/``). The last line on stdout is one JSON object: ``val_loss`` (nats per supervised token on
the fixed val set), ``context_free_floor`` (the same for a model that ignores its context),
``steps``, ``seconds``. ``--keep-serving S`` keeps the diagnostics up S seconds after that line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from trainer.api import HF_IGNORE_INDEX, Stream, StreamInfo  # noqa: E402
from trainer.runtime.processes import Child, python_module, stop_all  # noqa: E402

MODEL_INPUTS = ("input_ids", "labels", "attention_mask")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", required=True, help="text file or prepared folder for the producer")
    parser.add_argument("--max-steps", type=int, default=300)
    parser.add_argument("--http-port", type=int, default=8000, help="diagnostics port (0: any free port)")
    parser.add_argument("--port", type=int, default=0, help="the stream's ZeroMQ port (0: any free port)")
    parser.add_argument("--loop", choices=("plain", "hf"), default="plain", help="a plain PyTorch loop or HF Trainer")
    parser.add_argument("--model", choices=("modernbert", "bert"), default="modernbert",
                        help="ModernBertForMaskedLM (rotary positions) or BertForMaskedLM (learned absolute positions: "
                             "slow to leave the context-free plateau, docs/PLATEAU.md)")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--width", type=int, default=128, help="hidden size (4 heads; feed-forward 4x)")
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--warmup-steps", type=int, default=30)
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--keep-serving", type=float, default=0.0, help="seconds to keep the diagnostics up at the end")
    return parser.parse_args(argv)


def build_model(kind: str, info: StreamInfo, layers: int, width: int) -> torch.nn.Module:
    """A freshly initialised masked LM of the given shape for the stream (no download)."""
    import transformers

    shape = dict(vocab_size=info.vocab_size, hidden_size=width, num_hidden_layers=layers, num_attention_heads=4,
                 intermediate_size=4 * width, max_position_embeddings=info.block_size, pad_token_id=info.pad_id)
    if kind == "modernbert":  # rotary positions, pre-norm, GeGLU; every layer global (a row is one block)
        config = transformers.ModernBertConfig(**shape, global_attn_every_n_layers=1, embedding_dropout=0.0,
                                               attention_dropout=0.0, mlp_dropout=0.0, sep_token_id=info.sep_id,
                                               cls_token_id=None, bos_token_id=None, eos_token_id=None)
        return transformers.ModernBertForMaskedLM(config)
    config = transformers.BertConfig(**shape, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return transformers.BertForMaskedLM(config)


def val_loss(model: torch.nn.Module, batches: list[dict[str, torch.Tensor]]) -> float:
    """Mean cross-entropy over every supervised position of the val set (nats per token)."""
    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for batch in batches:
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            total += F.cross_entropy(logits.flatten(0, 1).float(), batch["labels"].flatten(), reduction="sum",
                                     ignore_index=HF_IGNORE_INDEX).item()
            count += int((batch["labels"] != HF_IGNORE_INDEX).sum())
    model.train()
    return total / count


def learning_rate(step: int, options: argparse.Namespace) -> float:
    """Linear warm-up, then cosine decay to a tenth over ``max_steps``."""
    if step < options.warmup_steps:
        return options.lr * (step + 1) / options.warmup_steps
    progress = min(1.0, (step - options.warmup_steps) / max(1, options.max_steps - options.warmup_steps))
    return options.lr * (0.1 + 0.9 * 0.5 * (1 + torch.cos(torch.tensor(progress * torch.pi)).item()))


def train_plain(model, stream: Stream, val, reporter, options: argparse.Namespace) -> None:
    optimizer = torch.optim.AdamW(model.parameters(), lr=options.lr, weight_decay=0.01)
    for step, batch in enumerate(stream, start=1):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step - 1, options)
        loss = model(**{name: batch[name] for name in MODEL_INPUTS}).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        evaluated = val_loss(model, val) if step % options.eval_every == 0 and step < options.max_steps else None
        reporter.report(step, loss=loss.item(), val_loss=evaluated, lr=optimizer.param_groups[0]["lr"])
        if step == options.max_steps:
            return


def train_hf(model, stream: Stream, val, reporter, options: argparse.Namespace, out_dir: str) -> None:
    """Hugging Face's Trainer on the stream's rows (it batches them itself)."""
    import transformers

    class Report(transformers.TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                evaluated = val_loss(model, val) if state.global_step % options.eval_every == 0 else None
                reporter.report(state.global_step, loss=logs["loss"], val_loss=evaluated, lr=logs.get("learning_rate"))

    arguments = transformers.TrainingArguments(
        output_dir=out_dir, max_steps=options.max_steps, per_device_train_batch_size=options.batch_size,
        learning_rate=options.lr, warmup_steps=options.warmup_steps, lr_scheduler_type="cosine", weight_decay=0.01,
        max_grad_norm=1.0, logging_steps=1, save_strategy="no", report_to=[], use_cpu=not torch.cuda.is_available(),
        dataloader_num_workers=0, remove_unused_columns=False, disable_tqdm=True)
    collate = lambda rows: {name: torch.stack([row[name] for row in rows]) for name in MODEL_INPUTS}
    transformers.Trainer(model=model, args=arguments, train_dataset=stream.dataset(rows=True), data_collator=collate,
                         callbacks=[Report()]).train()


def main(argv: list[str] | None = None) -> int:
    options = parse_args(argv)
    if options.threads:
        torch.set_num_threads(options.threads)
    torch.manual_seed(0)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as folder, Stream(f"tcp://127.0.0.1:{options.port or '*'}", options.batch_size,
                                                         hf_names=True, wait_timeout=120) as stream:
        producer = Child("producer", python_module("producer", "run", "--connect", stream.endpoint, "--corpus", options.corpus,
                                                   "--block-size", str(options.block_size)),
                         log_path=os.path.join(folder, "producer.log"))
        try:
            info = stream.info
            val = stream.val_batches()
            model = build_model(options.model, info, options.layers, options.width)
            with stream.serve_diagnostics(port=options.http_port, warmup_steps=min(100, options.max_steps)) as reporter:
                print(f"diagnostics: http://127.0.0.1:{reporter.port}/diagnostics", file=sys.stderr, flush=True)
                if options.loop == "plain":
                    train_plain(model, stream, val, reporter, options)
                else:
                    train_hf(model, stream, val, reporter, options, folder)
                final = val_loss(model, val)
                reporter.report(options.max_steps, val_loss=final)
                print(json.dumps({"val_loss": final, "context_free_floor": info.context_free_floor, "steps": options.max_steps,
                                  "model": options.model, "loop": options.loop,
                                  "seconds": round(time.perf_counter() - started, 1)}), flush=True)
                time.sleep(options.keep_serving)
        except BaseException:
            print(Path(folder, "producer.log").read_text(errors="replace")[-2000:], file=sys.stderr)
            raise
        finally:
            stop_all([producer], quiet=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
