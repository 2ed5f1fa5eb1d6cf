"""Demo tasks, as ``lightning.pytorch.demos``: importable by tests, benchmarks and examples.

- ``toy``: the MLP regression task of the tests and a multi-process ``fit`` that returns
  every rank's final state (imported here).
- ``gpt2_module`` / ``gpt2_data``: the GPT-2 LightningModule and DataModule of
  ``examples/train_gpt2.py`` (import them from their modules; they need ``transformers``
  and ``datasets``).
"""

from .toy import SaveRankState, ToyModule, fit, free_port, load_ranks, make_dataset

__all__ = ["SaveRankState", "ToyModule", "fit", "free_port", "load_ranks", "make_dataset"]
