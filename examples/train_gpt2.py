"""Train GPT-2 with HoloGrad (or DDP) from a YAML config: the LightningCLI entry point.

Two CPU processes on one machine, byte-level GPT-2 on the Python stdlib sources (no
network; a few minutes on 2 cores):

    python examples/train_gpt2.py fit --config configs/gpt2-tiny-cpu.yaml
    python examples/train_gpt2.py fit --config configs/gpt2-tiny-cpu-ddp.yaml   # DDP baseline

GPT-2 124M on N GPUs of one node, or on two nodes with N GPUs each:

    torchrun --nproc-per-node=N examples/train_gpt2.py fit --config configs/gpt2-small-gpu.yaml
    torchrun --nnodes 2 --node-rank R --nproc-per-node N --master-addr HOST --master-port 29500 \\
        examples/train_gpt2.py fit --config configs/gpt2-small-gpu.yaml --trainer.num_nodes 2

Any argument can be overridden on the command line (``--trainer.max_steps 50``,
``--trainer.strategy.num_directions 4096``, ``--data.dataset text --data.data_files
'[a.txt]'``); ``python examples/train_gpt2.py fit --help`` lists them all. Lightning's
script launcher re-runs this file once per extra rank, hence the main guard.

The model (``GPT2Module``) and the data (``GPT2DataModule``) are importable demos of the
package: ``lightning_holograd/demos/gpt2_module.py`` and ``gpt2_data.py``.
"""

from __future__ import annotations

from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

import lightning_holograd  # noqa: F401  registers strategy="holograd" before the config is parsed
from lightning_holograd.demos.gpt2_data import GPT2DataModule
from lightning_holograd.demos.gpt2_module import GPT2Module


class GPT2CLI(LightningCLI):
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("model.block_size", "data.block_size")
        parser.link_arguments("data.vocab_size", "model.vocab_size", apply_on="instantiate")


def main(args: list[str] | None = None) -> GPT2CLI:
    return GPT2CLI(GPT2Module, GPT2DataModule, seed_everything_default=1337,
                   save_config_kwargs={"overwrite": True}, args=args)


if __name__ == "__main__":
    main()
