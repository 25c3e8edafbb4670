"""Write predictions for a JSONL file with a (tuned) causal LM.

    python -m nlp.generate --pretrained /weights/llama-7b --adapter runs/.../adapter \\
        --task comment --input msg-test.jsonl --output predictions.jsonl

Batched and left-padded, with the KV cache; greedy by default, ``--num-beams`` for beam
search, ``--do-sample`` (``--temperature``, ``--top-p``, ``--num-samples``) for sampling.
Each output line holds ``index``, ``prediction`` (a list with ``--num-samples`` > 1),
``reference`` and ``where`` (file:line of the input record).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import core
from core.lightning import TRAINED_FILE, load_trained

from .data import DATA_FORMATS, TASKS, encode, read_records, render_input, response, write_jsonl
from .module import load_causal_lm
from .tokenizer import load_tokenizer


def load_tuned(pretrained: str, adapter: str | None, config: dict | None = None, seed: int = 0):
    """The base model with an exported adapter folder (or a full fine-tune's export)."""
    model = load_causal_lm(pretrained, config=config, seed=seed)
    if adapter:
        if (Path(adapter) / TRAINED_FILE).is_file() or str(adapter).endswith(TRAINED_FILE):
            load_trained(model, adapter)
        else:
            core.load_adapter(model, adapter)
    return model.eval()


def decode_batches(model, tokenizer, prompts: list[list[int]], batch_size: int, **options):
    """Generated texts per prompt (``num_return_sequences`` each), left-padded batches."""
    out: list[list[str]] = []
    for start in range(0, len(prompts), batch_size):
        rows = prompts[start : start + batch_size]
        width = max(map(len, rows))
        ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, row in enumerate(rows):
            ids[i, width - len(row) :] = torch.tensor(row)
            mask[i, width - len(row) :] = 1
        with torch.no_grad():
            gen = model.generate(
                input_ids=ids,
                attention_mask=mask,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
                use_cache=True,
                **options,
            )
        texts = tokenizer.batch_decode(gen[:, width:], skip_special_tokens=True)
        per = len(texts) // len(rows)
        out.extend(texts[i * per : (i + 1) * per] for i in range(len(rows)))
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--pretrained", required=True, help="local path or hub id of the base LM")
    p.add_argument("--backbone-config", help="JSON config of a random-init base (tests, demo)")
    p.add_argument("--init-seed", type=int, default=0)
    p.add_argument("--adapter", help="exported adapter folder (or trained.safetensors)")
    p.add_argument("--tokenizer", help="'byte' or path / hub id (default: --pretrained)")
    p.add_argument("--task", choices=TASKS, required=True)
    p.add_argument("--representation", default="diff", choices=("diff", "oldnew"))
    p.add_argument("--input", required=True, help="a JSONL file, a .buggy-fixed.buggy or a .tsv")
    p.add_argument("--format", default="codereviewer", choices=DATA_FORMATS, dest="data_format")
    p.add_argument("--output", required=True)
    p.add_argument("--max-length", type=int, default=1024)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--num-beams", type=int, default=1)
    p.add_argument("--do-sample", action="store_true")
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--num-samples", type=int, default=1)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> Path:
    args = parse_args(argv)
    config = json.loads(args.backbone_config) if args.backbone_config else None
    model = load_tuned(args.pretrained, args.adapter, config, args.init_seed)
    tokenizer = load_tokenizer(args.tokenizer or args.pretrained)
    records = read_records(args.input, args.task, args.data_format)
    prompts = [
        encode(
            tokenizer,
            args.task,
            render_input(r, args.task, args.representation),
            "",
            args.max_length - args.max_new_tokens,
            with_response=False,
        ).input_ids
        for r in records
    ]
    options = {"max_new_tokens": args.max_new_tokens, "num_beams": args.num_beams}
    if args.do_sample:
        options.update(do_sample=True, temperature=args.temperature, top_p=args.top_p)
    else:
        options["do_sample"] = False
    options["num_return_sequences"] = args.num_samples
    texts = decode_batches(model, tokenizer, prompts, args.batch_size, **options)
    rows = [
        {
            "index": i,
            "prediction": t[0] if args.num_samples == 1 else t,
            "reference": response(r, args.task),
            "where": r["_where"],
            **({k: r[k] for k in ("prompt", "test", "entry_point") if k in r}),
        }
        for i, (r, t) in enumerate(zip(records, texts, strict=True))
    ]
    return write_jsonl(args.output, rows)


if __name__ == "__main__":
    main()
