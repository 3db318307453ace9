"""Models in and out, in one place. In: "scratch", a GPT-2 name (downloaded from the Hugging Face hub), a
Hugging Face directory (config.json + model.safetensors, as transformers' save_pretrained writes it) or one of
our run directories (OUT_DIR/ckpt.pt) becomes a GPT, every mistake one line before anything is loaded. Out: a
GPT as a Hugging Face directory, with GPT-2's tokenizer files, that transformers loads:

    python -m machinery.models export out/demo/dpo exported/dpo     # then GPT2LMHeadModel.from_pretrained("exported/dpo")
"""
import json
import os
import sys
from dataclasses import fields

import torch
import torch.nn as nn

from machinery import UserError
from machinery.cli import ArgumentParser, user_errors
from machinery.files import atomic_write, write_text
from model import GPT, GPT2_SIZES, GPTConfig, CausalSelfAttention

# GPT-2's original code used Conv1D layers, whose weights are stored (in, out): nn.Linear wants (out, in)
CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# where tiktoken fetches GPT-2's vocabulary (tiktoken_ext/openai_public.py): the very files Hugging Face calls
# vocab.json and merges.txt; tiktoken keeps them in its cache once it has loaded "gpt2"
GPT2_VOCABULARY = {"vocab.json": "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json",
                   "merges.txt": "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe"}


def load_model(init, args):
    """The model a run starts from, on args.device: a fresh GPT for init "scratch" (shape from --n_layer,
    --n_head, --n_embd, block_size --max_len), else open_model(init). Dropout is a training choice, not part
    of the weights, so it is set here; --max_len must fit the model's position table."""
    if init == "scratch":
        model = GPT(GPTConfig(block_size=args.max_len, n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd))
    else:
        model = open_model(init)
    if args.max_len > model.config.block_size:
        raise UserError(f"--max_len {args.max_len} is longer than {init}'s block_size {model.config.block_size}")
    model.config.dropout = args.dropout
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = args.dropout
        if isinstance(module, CausalSelfAttention):
            module.dropout = args.dropout
    return model.to(args.device)


def open_model(path):
    """A GPT from one of our run directories, a Hugging Face directory or a GPT-2 name."""
    if os.path.isfile(os.path.join(path, "ckpt.pt")):
        checkpoint = load_checkpoint(os.path.join(path, "ckpt.pt"))
        known = {f.name for f in fields(GPTConfig)}  # a checkpoint's config, less fields of older versions
        model = GPT(GPTConfig(**{k: v for k, v in checkpoint["config"].items() if k in known}))
        load_weights(model, checkpoint["model"], where=path)
        return model
    if os.path.isfile(os.path.join(path, "log.jsonl")) and not os.path.isfile(os.path.join(path, "config.json")):
        raise UserError(f"{path} holds a run that never saved a checkpoint (a log.jsonl, no ckpt.pt): let it "
                        "train to its first checkpoint, or give another model")
    return load_pretrained(path)


def load_pretrained(name_or_dir):
    """OpenAI's GPT-2 by name, or a Hugging Face directory, after checking the name or directory, its
    config.json, and that model.safetensors is readable and holds every weight in the right shape (read from
    its header: cheap)."""
    from safetensors import safe_open
    from safetensors.torch import load_file
    if name_or_dir in GPT2_SIZES:
        config, path = GPTConfig(**GPT2_SIZES[name_or_dir]), download(name_or_dir)
    elif os.path.isdir(name_or_dir):
        config, path = read_hf_config(name_or_dir), os.path.join(name_or_dir, "model.safetensors")
        if not os.path.isfile(path):
            raise UserError(f"{name_or_dir} has no model.safetensors (nor a ckpt.pt of ours); give a "
                            "directory written by save_pretrained, or a GPT-2 name")
    else:
        raise UserError(f"unknown model {name_or_dir!r}: use one of {', '.join(GPT2_SIZES)}, a Hugging "
                        "Face directory (config.json + model.safetensors) or a run directory of ours")
    unreadable = UserError(f"{path} is not a readable safetensors file; download or save it again")
    try:
        with safe_open(path, framework="pt") as f:
            shapes = {key: torch.empty(f.get_slice(key).get_shape(), device="meta") for key in f.keys()}
    except Exception:  # a torn download, a file that is not safetensors
        raise unreadable from None
    with torch.device("meta"):  # shapes only: nothing allocated, nothing initialized
        expected = {k: tuple(v.shape) for k, v in GPT(config).state_dict().items()}
    check_state(expected, from_hf(shapes), f"weights in {path} for GPT-2 {config.n_layer} layers x {config.n_embd}")
    try:
        state = from_hf(load_file(path))
    except Exception:  # the header was whole, the data is not
        raise unreadable from None
    model = GPT(config)
    model.load_state_dict(state)
    return model


def from_hf(hf_state):
    """A Hugging Face GPT-2 state dict (either key layout) in our names and shapes."""
    state = {}
    for key, tensor in hf_state.items():
        if key.endswith((".attn.bias", ".attn.masked_bias")):
            continue  # causal-mask buffers of old checkpoints, not weights
        if not key.startswith(("transformer.", "lm_head.")):
            key = "transformer." + key  # the hub's gpt2 files have no "transformer." prefix
        state[key] = tensor.t() if key.endswith(CONV1D_WEIGHTS) else tensor
    state.setdefault("lm_head.weight", state.get("transformer.wte.weight"))  # tied, often not stored
    return state


def read_hf_config(directory):
    """GPTConfig of a Hugging Face GPT-2 directory's config.json, each field checked."""
    path = os.path.join(directory, "config.json")
    try:
        with open(path) as f:
            hf = json.load(f)
        values = dict(block_size=hf["n_positions"], vocab_size=hf["vocab_size"], n_layer=hf["n_layer"],
                      n_head=hf["n_head"], n_embd=hf["n_embd"])
    except FileNotFoundError:
        raise UserError(f"{directory} has no config.json; give a directory written by save_pretrained, "
                        "a run directory of ours, or a GPT-2 name") from None
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not a GPT-2 config ({type(e).__name__}: {e})") from None
    for name, value in values.items():
        if type(value) is not int or value < 1:  # bool is an int to Python, not here
            raise UserError(f"{path}: {name} is {value!r}, expected a positive whole number")
    if values["n_embd"] % values["n_head"]:
        raise UserError(f"{path}: n_embd {values['n_embd']} is not a multiple of n_head {values['n_head']}")
    return GPTConfig(**values)


def download(name):
    """Path of name's model.safetensors in the hub cache, downloading it on first use. Without a network the
    hub library retries for about 20 s, then this is one line; HF_HUB_OFFLINE=1 skips the retries."""
    from huggingface_hub import hf_hub_download
    try:
        return hf_hub_download(repo_id=f"openai-community/{name}", filename="model.safetensors")
    except Exception as e:  # offline, DNS failure, proxy: all say the same to the user
        raise UserError(f"could not download {name} from the Hugging Face hub ({type(e).__name__}): check the "
                        "network, or pass a local directory with config.json and model.safetensors (on a CPU, "
                        "--demo trains a small model from scratch instead)") from None


def load_checkpoint(path, resuming=False):
    """A ckpt.pt of ours, memory-mapped (tensors are read when used). Anything else is one line."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except FileNotFoundError:
        raise UserError(f"no checkpoint at {path}") from None
    except Exception as e:  # not a zip, a torn file, random bytes: PyTorch's advice would only mislead here
        raise UserError(f"{path} is not a readable checkpoint ({type(e).__name__}); it should be a ckpt.pt "
                        "written by sft.py, dpo.py or rlhf.py") from None
    needed = ("model", "config", "optimizer", "iter", "args", "rng") if resuming else ("model", "config")
    missing = [key for key in needed if not isinstance(checkpoint, dict) or key not in checkpoint]
    if missing:
        raise UserError(f"{path} is not a checkpoint of ours (no {', '.join(missing)}); it should be a ckpt.pt "
                        "written by sft.py, dpo.py or rlhf.py")
    return checkpoint


def stage_of(directory):
    """The script that wrote the checkpoint in directory ("sft", "dpo", ...), or None."""
    path = os.path.join(directory, "ckpt.pt")
    return load_checkpoint(path).get("stage") if os.path.isfile(path) else None


def check_models(models, out_dir, demo=False):
    """Fail in one line, before anything is written, if a model flag ({flag: value}) names nothing, or if
    the run would write over a model it starts from or compares with."""
    for flag, name in models.items():
        if name in GPT2_SIZES or name == "scratch":
            continue
        if not os.path.exists(name) and demo:
            raise UserError(f"no model at {flag} {name}: run `python sft.py --demo` first, or pass gpt2 (or another "
                            "GPT-2 name), a Hugging Face directory or a run directory")
        if not os.path.exists(name):
            raise UserError(f"no model at {flag} {name}: the defaults are the GPU recipe (GPT-2 on HH-RLHF, after "
                            "`python sft.py`); pass gpt2 (or another GPT-2 name), a Hugging Face directory or a run "
                            "directory. On a CPU, --demo runs the toy task; offline, --data "
                            "examples/hh-rlhf-harmless-base is HH's shipped excerpt")
        if os.path.realpath(name) == os.path.realpath(out_dir):
            raise UserError(f"--out_dir {out_dir} is also {flag}: writing there would replace it; give another --out_dir")


def check_same_shape(policy, reference, init, ref):
    """DPO starts the policy at its reference: the two must be the same architecture."""
    a, b = policy.config, reference.config
    if (a.n_layer, a.n_head, a.n_embd, a.vocab_size) != (b.n_layer, b.n_head, b.n_embd, b.vocab_size):
        raise UserError(f"--init {init} ({a.n_layer} layers x {a.n_embd}) and --ref {ref} ({b.n_layer} layers x "
                        f"{b.n_embd}) differ in shape; DPO starts the policy at the reference")


def load_weights(model, state, where="checkpoint"):
    """load_state_dict, after check_state has given any mismatch as one line."""
    check_state({k: v.shape for k, v in model.state_dict().items()}, state, f"the weights in {where}")
    model.load_state_dict(state)


def check_state(expected, state, where):
    """One line naming missing or unexpected keys, or the first key whose shape differs (both shapes)."""
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise UserError(f"{where} do not fit the model: missing keys {missing[:3]}, unexpected keys {unexpected[:3]}")
    for key, shape in expected.items():
        if tuple(state[key].shape) != tuple(shape):
            raise UserError(f"{where} do not fit the model: {key} has shape {tuple(state[key].shape)} there, "
                            f"{tuple(shape)} here")


# ----------------------------------------------------------------------------------------------------
# Out: a Hugging Face directory

def save_pretrained(model, directory):
    """config.json + model.safetensors in Hugging Face's GPT-2 layout (GPT2LMHeadModel loads it) and, for
    GPT-2's vocabulary, its tokenizer files (AutoTokenizer loads them)."""
    from safetensors.torch import save_file
    c = model.config
    config = dict(model_type="gpt2", architectures=["GPT2LMHeadModel"], vocab_size=c.vocab_size,
                  n_positions=c.block_size, n_embd=c.n_embd, n_layer=c.n_layer, n_head=c.n_head,
                  n_inner=None, activation_function="gelu_new", layer_norm_epsilon=1e-5,
                  resid_pdrop=c.dropout, embd_pdrop=c.dropout, attn_pdrop=c.dropout,
                  tie_word_embeddings=True)
    gpt2_vocabulary = c.vocab_size == 50257  # <|endoftext|> and the tokenizer exist only for the full vocabulary
    config.update(bos_token_id=50256 if gpt2_vocabulary else None, eos_token_id=50256 if gpt2_vocabulary else None)
    weights = {}
    for key, tensor in model.state_dict().items():
        if key == "lm_head.weight":
            continue  # tied to transformer.wte.weight; the loader ties it again
        if key.endswith(CONV1D_WEIGHTS):
            tensor = tensor.t()  # back to Conv1D's (in, out)
        weights[key] = tensor.detach().to("cpu").contiguous()
    files = {"config.json": json.dumps(config, indent=2) + "\n"}
    if gpt2_vocabulary:
        files.update(tokenizer_files(c.block_size))
    os.makedirs(directory, exist_ok=True)
    atomic_write(os.path.join(directory, "model.safetensors"), lambda path: save_file(weights, path))
    for name, text in files.items():
        write_text(os.path.join(directory, name), text)


def tokenizer_files(block_size):
    """GPT-2's tokenizer as Hugging Face reads it: vocab.json and merges.txt are the files tiktoken reads."""
    from tiktoken.load import read_file_cached
    try:
        files = {name: read_file_cached(url).decode("utf-8") for name, url in GPT2_VOCABULARY.items()}
    except Exception as e:
        raise UserError(f"could not read GPT-2's vocabulary files ({type(e).__name__}); with no network, set "
                        "TIKTOKEN_CACHE_DIR to a folder holding tiktoken's files (see README)") from None
    special = "<|endoftext|>"
    files["tokenizer_config.json"] = json.dumps(dict(tokenizer_class="GPT2Tokenizer", model_max_length=block_size,
                                                     bos_token=special, eos_token=special, unk_token=special,
                                                     add_prefix_space=False), indent=2) + "\n"
    return files


def export(run_dir, directory):
    """`python -m machinery.models export RUN_DIR DIRECTORY`: a model we trained, as a Hugging Face directory.
    Refuses a DIRECTORY that holds anything, so nothing is written over."""
    if os.path.exists(directory) and (not os.path.isdir(directory) or os.listdir(directory)):
        raise UserError(f"{directory} exists and is not an empty directory: give a new one")
    model = open_model(run_dir)
    try:
        save_pretrained(model, directory)
    except OSError as e:
        raise UserError(f"cannot write {directory} ({e.strerror})") from None
    print(f"wrote {directory}: load it with transformers.GPT2LMHeadModel.from_pretrained({directory!r}) and "
          f"AutoTokenizer.from_pretrained({directory!r})")


def main(argv=None):
    parser = ArgumentParser(prog="python -m machinery.models", description="Write a model we trained (a run "
                            "directory holding ckpt.pt) as a Hugging Face directory: config.json, model.safetensors "
                            "and GPT-2's tokenizer files.")
    parser.add_argument("command", choices=["export"])
    parser.add_argument("run_dir", help="a run directory of ours (sft.py's or dpo.py's --out_dir)")
    parser.add_argument("directory", help="the Hugging Face directory to write (new, or empty)")
    args = parser.parse_args(argv)
    with user_errors():
        export(args.run_dir, args.directory)


if __name__ == "__main__":
    main(sys.argv[1:])
