"""The machinery: everything a real tool needs that is not the method.

The lesson is model.py, data.py, sft.py, dpo.py and sample.py. What is here makes them a tool you can leave
running overnight, and none of it is needed to understand DPO:

    cli           flags, their checks, and one-line errors
    compute       device, precision (autocast, GradScaler), torchrun's processes
    run           an out_dir holds one run: lock, resume, evaluate-check-save, log.jsonl, Ctrl-C and SIGTERM
    models        models in (scratch, GPT-2 names, Hugging Face directories, our runs) and out (export)
    files         files written whole (atomic), paths, free space
    formats       every preference-file and record format, hub datasets, held-out splits
    fast          the opt-in fast paths: the chunked output layer, packed rows, a precomputed reference
    results       sample.py's files: LABEL=MODEL, prompt files, tables, strict JSON
    inspect_data  python -m machinery.inspect_data: the data, token by token
"""


class UserError(Exception):
    """A mistake the user can fix (a bad path, a bad flag): printed as one line, never a traceback."""
