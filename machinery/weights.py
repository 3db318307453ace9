"""Hugging Face weights in, checked, and out: GPT-2 by name from the hub, or a directory holding
config.json and model.safetensors (what transformers' save_pretrained writes). model.GPT.from_pretrained
is the plain loader; load_pretrained checks everything first, so a user's mistake is one line."""
import json
import os

import torch

from machinery import UserError, hub_or_offline
from machinery.checkpoints import atomic_write, check_state
from model import CONV1D_WEIGHTS, GPT, GPT2_SIZES, GPTConfig, from_hf


def load_pretrained(name_or_dir):
    """GPT.from_pretrained(name_or_dir), after checking the name or directory, its config.json, and that
    model.safetensors is readable and holds every weight of the right shape (read from its header: cheap)."""
    from safetensors import safe_open
    if name_or_dir in GPT2_SIZES:
        config, path = GPTConfig(**GPT2_SIZES[name_or_dir]), download(name_or_dir)
    elif os.path.isdir(name_or_dir):
        config, path = read_hf_config(name_or_dir), os.path.join(name_or_dir, "model.safetensors")
        if not os.path.isfile(path):
            raise UserError(f"{name_or_dir} has no model.safetensors (nor a ckpt.pt of ours); give a "
                            "directory written by save_pretrained, or a GPT-2 name")
    else:
        raise UserError(f"unknown model {name_or_dir!r}: use one of {', '.join(GPT2_SIZES)}, a Hugging "
                        "Face directory (config.json + model.safetensors) or a checkpoint directory")
    try:
        with safe_open(path, framework="pt") as f:
            shapes = {key: torch.empty(f.get_slice(key).get_shape(), device="meta") for key in f.keys()}
        with torch.device("meta"):  # shapes only: nothing allocated, nothing initialized
            expected = {k: tuple(v.shape) for k, v in GPT(config).state_dict().items()}
    except Exception as e:  # a torn download, a file that is not safetensors
        raise UserError(f"{path} is not a readable safetensors file ({type(e).__name__}); download or "
                        "save it again") from None
    check_state(expected, from_hf(shapes), f"weights in {path} for GPT-2 {config.n_layer} layers x {config.n_embd}")
    try:
        return GPT.from_pretrained(name_or_dir)
    except Exception as e:  # the header was whole, the data is not
        raise UserError(f"{path} is not a readable safetensors file ({type(e).__name__}); download or "
                        "save it again") from None


def read_hf_config(directory):
    """GPTConfig of a Hugging Face GPT-2 directory's config.json, each field checked."""
    path = os.path.join(directory, "config.json")
    try:
        with open(path) as f:
            hf = json.load(f)
        fields = dict(block_size=hf["n_positions"], vocab_size=hf["vocab_size"], n_layer=hf["n_layer"],
                      n_head=hf["n_head"], n_embd=hf["n_embd"])
    except FileNotFoundError:
        raise UserError(f"{directory} has no config.json; give a directory written by save_pretrained, "
                        "a checkpoint directory, or a GPT-2 name") from None
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not a GPT-2 config ({type(e).__name__}: {e})") from None
    for name, value in fields.items():
        if type(value) is not int or value < 1:  # bool is an int to Python, not here
            raise UserError(f"{path}: {name} is {value!r}, expected a positive whole number")
    if fields["n_embd"] % fields["n_head"]:
        raise UserError(f"{path}: n_embd {fields['n_embd']} is not a multiple of n_head {fields['n_head']}")
    return GPTConfig(**fields)


def download(name):
    """Path of name's model.safetensors in the hub cache, downloading it on first use."""
    hub_or_offline()
    from huggingface_hub import hf_hub_download
    try:
        return hf_hub_download(repo_id=f"openai-community/{name}", filename="model.safetensors")
    except Exception as e:  # offline, DNS failure, proxy: all say the same to the user
        raise UserError(f"could not download {name} from the Hugging Face hub ({type(e).__name__}); "
                        "check the network, or pass a local directory with config.json and "
                        "model.safetensors") from None


def save_pretrained(model, directory):
    """config.json + model.safetensors in Hugging Face's GPT-2 layout (GPT2LMHeadModel loads it)."""
    from safetensors.torch import save_file
    c = model.config
    config = dict(model_type="gpt2", architectures=["GPT2LMHeadModel"], vocab_size=c.vocab_size,
                  n_positions=c.block_size, n_embd=c.n_embd, n_layer=c.n_layer, n_head=c.n_head,
                  n_inner=None, activation_function="gelu_new", layer_norm_epsilon=1e-5,
                  resid_pdrop=c.dropout, embd_pdrop=c.dropout, attn_pdrop=c.dropout,
                  tie_word_embeddings=True)
    if c.vocab_size > 50256:  # GPT-2's <|endoftext|> exists only in a full-size vocabulary
        config.update(bos_token_id=50256, eos_token_id=50256)
    weights = {}
    for key, tensor in model.state_dict().items():
        if key == "lm_head.weight":
            continue  # tied to transformer.wte.weight; the loader ties it again
        if key.endswith(CONV1D_WEIGHTS):
            tensor = tensor.t()  # back to Conv1D's (in, out)
        weights[key] = tensor.detach().to("cpu").contiguous()
    os.makedirs(directory, exist_ok=True)
    atomic_write(os.path.join(directory, "model.safetensors"), lambda path: save_file(weights, path))

    def write_config(path):
        with open(path, "w") as f:
            f.write(json.dumps(config, indent=2) + "\n")
    atomic_write(os.path.join(directory, "config.json"), write_config)
