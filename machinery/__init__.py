"""The machinery: everything a real tool needs that is not the method.

The lesson is model.py, data.py, sft.py, dpo.py and sample.py. What is here makes them a tool you can
leave running overnight, and none of it is needed to understand DPO:

    cli          flags, their checks, and one-line errors
    compute      device, precision (autocast, GradScaler), the optimizer step, torchrun (DDP)
    checkpoints  out_dir, lock, atomic saves, --resume and what it checks, loading a model to train
    runlog       log.jsonl, the health checks, Ctrl-C and SIGTERM
    run          Run: the one object a training loop talks to (all of the above)
    formats      every preference-file and record format, hub datasets, held-out splits
    weights      Hugging Face weights in (checked) and out (save_pretrained)
    fast         the fast paths: the chunked output layer, packed rows
    results      sample.py's files: LABEL=MODEL, prompt files, tables, strict JSON
    inspect_data python data.py --inspect
"""


class UserError(Exception):
    """A mistake the user can fix (a bad path, a bad flag): printed as one line, never a traceback."""


def hub_or_offline(timeout=5.0):
    """Before the first call to the Hugging Face hub: if huggingface.co does not answer within `timeout`
    seconds, this process goes offline (HF_HUB_OFFLINE=1), so the hub libraries answer from their cache
    at once instead of retrying for half a minute. Nothing changes behind a proxy or when already offline."""
    import os
    import socket
    import sys
    proxied = any(os.environ.get(name) for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"))
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "") or proxied:
        return
    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
        return
    except OSError:
        pass
    os.environ["HF_HUB_OFFLINE"] = os.environ["HF_DATASETS_OFFLINE"] = "1"
    for module, attribute in (("huggingface_hub.constants", "HF_HUB_OFFLINE"), ("datasets.config", "HF_HUB_OFFLINE"),
                              ("datasets.config", "HF_DATASETS_OFFLINE")):
        if module in sys.modules:  # read at import: set where it was already read
            setattr(sys.modules[module], attribute, True)
