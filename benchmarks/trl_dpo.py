"""TRL's DPOTrainer on the comparison workload, for a given number of optimizer steps (CPU, fp32).

The other half of compare_trl.py, in its own process so that its time and peak memory are its own.
Needs `pip install trl` (nothing else in the project does). Settings as on our side: batch 4 pairs, no
accumulation, beta 0.1, lr 1e-6, AdamW (TRL's default optimizer), sequences up to 256 tokens (none is
cut), no gradient checkpointing.

    python -m benchmarks.trl_dpo --workload out/trl-workload --steps 10
"""
import os
import sys
import tempfile
import time

from benchmarks import workload
from machinery.cli import ArgumentParser, HelpFormatter


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__.splitlines()[0], formatter_class=HelpFormatter)
    p.add_argument("--workload", required=True, help="the folder benchmarks/workload.py built")
    p.add_argument("--steps", type=int, required=True, help="optimizer steps")
    p.add_argument("--batch_size", type=int, default=4, help="pairs per step")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    try:
        from trl import DPOConfig, DPOTrainer
    except ImportError:
        sys.exit("error: the TRL side of the comparison needs trl: pip install trl")
    import torch
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    checkpoint = os.path.join(args.workload, workload.CHECKPOINT)
    pairs = os.path.join(args.workload, "pairs.jsonl")
    if not os.path.isfile(pairs) or not os.path.isdir(checkpoint):
        sys.exit(f"error: no workload in {args.workload}: build it with python -m benchmarks.workload {args.workload}")
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)  # GPT-2's vocab.json and merges.txt
    tokenizer.pad_token = tokenizer.eos_token  # GPT-2 has no padding token
    model = AutoModelForCausalLM.from_pretrained(checkpoint)
    dataset = load_dataset("json", data_files=pairs, split="train")  # all 400 pairs
    with tempfile.TemporaryDirectory() as output_dir:
        config = DPOConfig(output_dir=output_dir, per_device_train_batch_size=args.batch_size,
                           gradient_accumulation_steps=1, max_steps=args.steps, learning_rate=1e-6, beta=0.1,
                           max_length=workload.MAX_TOKENS, gradient_checkpointing=False, use_cpu=True, bf16=False,
                           dataloader_num_workers=0, logging_steps=1000, save_strategy="no", report_to="none",
                           disable_tqdm=True, seed=0)
        trainer = DPOTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer)
        t0 = time.time()
        loss = trainer.train().training_loss
    print(f"trl: {args.steps} steps in {time.time() - t0:.2f} s, loss {loss:.4f}")


if __name__ == "__main__":
    main()
