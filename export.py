"""Merge a trained LoRA adapter into its base model: a plain Hugging Face model directory that
transformers, vLLM or llama.cpp's convert_hf_to_gguf.py load with no peft and no r3 code.

    python export.py runs/countdown-r3 --out exported/countdown-r3        # a run dir or an adapter dir
    python export.py runs/countdown-r3/ckpt-000010/adapter --out merged --dtype float16

The base model is the one the adapter was trained on (its adapter_config.json names it; --model
overrides). The base loads in the output dtype, on the GPU when there is one, and each layer's LoRA
product is added in fp32 (for a 7B model: ~15 GB in bf16, not ~30 GB of fp32 on the CPU); with --dtype
the checkpoint's own dtype (bf16 for most) that is the fp32 merge, rounded once.

An adapter trained on a 4-bit base (--4bit) is merged into the full-precision weights. That is close to,
not exactly, the policy it learned: it was trained against the NF4-rounded weights, and the merged model
differs from them by the rounding. Merging into NF4 weights would re-quantise them (and many tools cannot
read NF4); `eval.py --adapter <run>` scores the trained policy itself (on the 4-bit base, as trained).
"""
import argparse
from pathlib import Path

import torch

import cli

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_args(argv=None):
    p = cli.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("adapter", help="a run directory (its latest checkpoint) or an adapter directory")
    p.add_argument("--out", required=True, help="the directory to write the merged model to (must not exist; "
                   "its parent is made if missing)")
    p.add_argument("--model", default=None, help="the base model (default: the one the adapter names)")
    p.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES), help="weights' dtype in the output")
    args = p.parse_args(argv)
    cli.check_not_empty(p, args)
    return args


def base_model_name(adapter_dir: Path) -> str:
    """The base model an adapter was trained on, as peft recorded it (its files checked: one line if damaged)."""
    from model import check_adapter
    name = check_adapter(adapter_dir).get("base_model_name_or_path")
    return name if isinstance(name, str) else ""


def base_model(adapter_dir: Path, model: str | None = None) -> str:
    """--model, else the base the adapter names; the embedded model's cache path (what peft records) is
    the embedded model. Checked by name now, so a wrong one fails before anything loads."""
    from model import DEFAULT_MODEL, embedded_model_dir, resolve
    name = model or base_model_name(adapter_dir) or DEFAULT_MODEL
    if name != DEFAULT_MODEL and Path(name).resolve() == embedded_model_dir().resolve():
        name = DEFAULT_MODEL
    resolve(name)
    return name


def export(adapter_dir: Path, out: Path, model: str | None = None, dtype=torch.bfloat16, device=None) -> Path:
    """Load base (in dtype) + adapter, fold the LoRA product into the base weights, save model and tokenizer."""
    from model import load_model
    name = base_model(adapter_dir, model)
    peft_model, tok = load_model(name, adapter=str(adapter_dir), device=device, dtype=dtype)
    merge_in_fp32(peft_model)
    merged = peft_model.unload()  # the LoRA layers gone, the (merged) base weights kept: a plain model
    out.parent.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def merge_in_fp32(peft_model):
    """W <- W + (alpha / r) * B @ A for every LoRA layer, added in fp32 and rounded once to W's dtype: one
    layer's fp32 copy at a time, never the whole model's."""
    from peft.tuners.lora import LoraLayer
    with torch.no_grad():
        for module in peft_model.modules():
            if isinstance(module, LoraLayer):
                weight = module.get_base_layer().weight
                for name in module.active_adapters:
                    if name in module.lora_A:
                        delta = module.get_delta_weight(name).to(weight.device, torch.float32)
                        weight.data = (weight.data.float() + delta).to(weight.dtype)


def main(argv=None):
    args = parse_args(argv)
    # Everything that can be wrong without the model, before it loads and merges (a minute for a 7B model).
    out = cli.new_dir(args.out, "--out")
    from model import resolve_adapter
    adapter = resolve_adapter(args.adapter)
    model = base_model(adapter, args.model)
    export(adapter, out, model, DTYPES[args.dtype])
    print(f"merged {adapter} into {out}: load it with AutoModelForCausalLM.from_pretrained('{out}')")


if __name__ == "__main__":
    cli.run(main)
