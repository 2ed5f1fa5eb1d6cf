"""The GPT-2 example: its data, its model, its configs, and its CLI end to end.

In-process tests cover the data (stdlib corpus: deterministic, bytes, disjoint split;
local files through ``datasets`` at byte level and with a tokenizer built here), the
model (random init unless ``pretrained`` is given) and that every config parses.

``test_cli_trains_and_checkpoints`` runs the README's main command for 30 steps on 2 CPU
processes (Lightning's script launcher, gloo) with the network switched off for Hugging
Face. Loss criterion: the mean of the last 5 per-step train losses (rank 0) is at least
1.0 nat below the mean of the first 5. Measured with the tiny config's K = 4,096: 5.27 ->
3.39 (a drop of 1.89 nats; the loss starts near ln 256 = 5.55). The same run with
lr = 1e-9, i.e. one that does not learn, goes 5.42 -> 5.43, so the bound separates the
two with ~0.9 nat to spare on either side. The run takes ~21 s on 2 cores.
"""

from __future__ import annotations

import csv
import math
import os
import runpy
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lightning_holograd.demos.gpt2_data import GPT2DataModule, TokenBlocks, stdlib_corpus, stdlib_files
from lightning_holograd.demos.gpt2_module import GPT2Module
from lightning_holograd.strategies.checkpoint import STATE_KEY

REPO = Path(__file__).resolve().parents[2]
# The example is a script, not a module: run its definitions (the main guard keeps it from training).
GPT2CLI = runpy.run_path(str(REPO / "examples" / "train_gpt2.py"), run_name="train_gpt2")["GPT2CLI"]

TINY = REPO / "configs" / "gpt2-tiny-cpu.yaml"
CONFIGS = sorted((REPO / "configs").glob("gpt2-*.yaml"))
TINY_D = 445_952  # parameters of the tiny config, as stated in its comments
CLI_STEPS, CLI_TIMEOUT_S, LOSS_DROP = 30, 240, 1.0


# -- helpers -------------------------------------------------------------------------------
def child_env() -> dict[str, str]:
    """This environment without any launcher/cluster topology, one thread, Hugging Face offline."""
    topology = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "NODE_RANK",
                "GROUP_RANK", "KUBERNETES_PORT")
    prefixes = ("TORCHELASTIC_", "SLURM_", "PL_", "OMPI_COMM_WORLD_", "PMI_", "LSB_", "JSM_NAMESPACE_")
    env = {k: v for k, v in os.environ.items() if k not in topology and not k.startswith(prefixes)}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    return env


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines))
    return path


def text_lines(count: int, start: int = 0) -> list[str]:
    return [f"row {i}: def f{i}(x): return x * {i % 7} + {i}  # the quick brown fox" for i in range(start, start + count)]


def build_tokenizer(lines: list[str], directory: Path) -> Path:
    """A byte-level BPE tokenizer trained on ``lines`` in-process, saved as a transformers tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<|endoftext|>"])
    tokenizer.train_from_iterator(lines, trainer)
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>").save_pretrained(directory)
    return directory


@pytest.fixture(autouse=True)
def script_argv(monkeypatch: pytest.MonkeyPatch) -> None:
    """LightningCLI(args=...) warns when sys.argv (pytest's) carries arguments too."""
    monkeypatch.setattr(sys, "argv", ["examples/train_gpt2.py"])


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any attempt to open a network connection fails the test."""
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"network access attempted: {args!r}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


# -- the embedded stdlib corpus ------------------------------------------------------------
def test_stdlib_corpus_is_deterministic_bytes_of_the_sorted_files() -> None:
    train, val = stdlib_corpus(max_bytes=300_000, val_every=4)
    again_train, again_val = stdlib_corpus(max_bytes=300_000, val_every=4)
    assert torch.equal(train, again_train) and torch.equal(val, again_val)
    assert train.dtype == torch.uint8 and len(train) + len(val) == 300_000
    window = TokenBlocks(train, block_size=64)[3]
    assert window.dtype == torch.long and window.shape == (64,) and 0 <= int(window.min()) <= int(window.max()) < 256
    files = stdlib_files()
    assert files and all(f.suffix == ".py" and "site-packages" not in f.parts for f in files)
    first = files[0].read_bytes()  # file 0 is a training file (val_every - 1 = 3)
    assert bytes(train[: len(first)].numpy()) == first


def test_stdlib_split_is_disjoint_by_file() -> None:
    val_every, budget = 3, 120_000
    train, val = stdlib_corpus(max_bytes=budget, val_every=val_every)
    expected: tuple[list[bytes], list[bytes]] = ([], [])
    remaining = budget
    for i, path in enumerate(stdlib_files()):
        if remaining <= 0:
            break
        text = path.read_bytes()[:remaining]
        expected[i % val_every == val_every - 1].append(text)
        remaining -= len(text)
    assert len(expected[1]) >= 2, "the budget should span several validation files"
    assert bytes(train.numpy()) == b"".join(expected[0])
    assert bytes(val.numpy()) == b"".join(expected[1])


def test_token_blocks_are_consecutive_non_overlapping_windows() -> None:
    tokens = torch.arange(103, dtype=torch.int32)
    blocks = TokenBlocks(tokens, block_size=10)
    assert len(blocks) == 10
    assert torch.equal(torch.cat([blocks[i] for i in range(len(blocks))]), torch.arange(100))
    with pytest.raises(ValueError, match="block_size"):
        TokenBlocks(tokens, block_size=200)


# -- any text through `datasets` -----------------------------------------------------------
def test_local_text_files_at_byte_level(tmp_path: Path) -> None:
    train_lines, val_lines = text_lines(40), text_lines(8, start=1000)
    files = {"train": str(write_lines(tmp_path / "train.txt", train_lines)),
             "validation": str(write_lines(tmp_path / "val.txt", val_lines))}
    data = GPT2DataModule(dataset="text", data_files=files, cache_dir=str(tmp_path / "cache"), block_size=16)
    data.setup("fit")
    assert data.vocab_size == 256
    assert bytes(data.train_tokens.numpy()).decode() == "".join(line + "\n" for line in train_lines)
    assert bytes(data.val_tokens.numpy()).decode() == "".join(line + "\n" for line in val_lines)
    assert next(iter(data.train_dataloader())).shape == (16, 16)


def test_local_text_file_holds_out_every_nth_row(tmp_path: Path) -> None:
    lines = text_lines(20)
    data = GPT2DataModule(dataset="text", data_files=str(write_lines(tmp_path / "all.txt", lines)),
                          cache_dir=str(tmp_path / "cache"), val_every=5)
    data.setup("fit")
    val_text = bytes(data.val_tokens.numpy()).decode()
    assert val_text == "".join(lines[i] + "\n" for i in (4, 9, 14, 19))
    assert bytes(data.train_tokens.numpy()).decode() == "".join(
        lines[i] + "\n" for i in range(20) if i % 5 != 4)


def test_local_text_files_with_a_local_tokenizer_through_the_cli(tmp_path: Path, no_network: None) -> None:
    lines = text_lines(60)
    tokenizer_dir = build_tokenizer(lines, tmp_path / "tokenizer")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    data_file = write_lines(tmp_path / "corpus.txt", lines)
    cli = GPT2CLI(GPT2Module, GPT2DataModule, run=False, args=[
        "--config", str(TINY), "--trainer.logger=false", f"--trainer.default_root_dir={tmp_path}",
        "--model.block_size=16", "--data.dataset=text", f"--data.data_files={data_file}",
        f"--data.tokenizer={tokenizer_dir}", f"--data.cache_dir={tmp_path / 'cache'}", "--data.batch_size=4"])
    assert cli.datamodule.vocab_size == len(tokenizer) > 256
    assert cli.model.model.config.vocab_size == len(tokenizer)  # linked from the data by the CLI
    cli.datamodule.setup("fit")
    train_text = tokenizer.decode(cli.datamodule.train_tokens.tolist())
    assert train_text == "".join(lines[i] + "\n" for i in range(60) if i % 10 != 9)
    batch = next(iter(cli.datamodule.train_dataloader()))  # (4, 16)
    assert batch.shape == (4, 16) and int(batch.max()) < len(tokenizer)
    with torch.no_grad():
        assert math.isfinite(cli.model.loss(batch).item())


def test_data_module_rejects_inconsistent_settings() -> None:
    with pytest.raises(ValueError, match="val_every=1"):
        GPT2DataModule(val_every=1)
    with pytest.raises(ValueError, match="dataset=text"):
        GPT2DataModule(tokenizer="gpt2")  # a tokenizer without a dataset: the stdlib corpus is bytes


# -- the model -----------------------------------------------------------------------------
def test_default_config_builds_offline_with_random_init(tmp_path: Path, no_network: None,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    from transformers import GPT2LMHeadModel

    from lightning_holograd import HoloGradStrategy

    def never(*args: object, **kwargs: object) -> None:
        raise AssertionError("from_pretrained called without model.pretrained")

    monkeypatch.setattr(GPT2LMHeadModel, "from_pretrained", never)
    cli = GPT2CLI(GPT2Module, GPT2DataModule, run=False, args=[
        "--config", str(TINY), "--trainer.logger=false", f"--trainer.default_root_dir={tmp_path}"])
    config = cli.model.model.config
    assert (config.vocab_size, config.n_positions, config.n_layer, config.n_embd) == (256, 128, 2, 128)
    assert sum(p.numel() for p in cli.model.parameters()) == TINY_D
    assert cli.datamodule.hparams.block_size == 128  # linked from model.block_size
    strategy = cli.trainer.strategy
    assert isinstance(strategy, HoloGradStrategy)
    assert (strategy.config.num_directions, strategy.config.directions) == (4096, "sketch")


def test_pretrained_weights_load_only_when_asked(tmp_path: Path, no_network: None) -> None:
    saved = GPT2Module(n_layer=1, n_head=2, n_embd=32, block_size=32).model
    saved.save_pretrained(tmp_path / "tiny-gpt2")
    loaded = GPT2Module(pretrained=str(tmp_path / "tiny-gpt2")).model
    assert loaded.config.n_embd == 32  # shape comes from the checkpoint, not the arguments
    assert all(torch.equal(a, b) for a, b in zip(saved.state_dict().values(), loaded.state_dict().values()))
    with pytest.raises(ValueError, match="vocab_size"):
        GPT2Module(vocab_size=1000, pretrained=str(tmp_path / "tiny-gpt2"))


@pytest.mark.parametrize("config", CONFIGS, ids=[c.name for c in CONFIGS])
def test_configs_parse(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        GPT2CLI(GPT2Module, GPT2DataModule, args=["fit", "--config", str(config), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = capsys.readouterr().out
    assert ("lightning_holograd.HoloGradStrategy" in printed) != config.stem.endswith("-ddp")


def test_expected_configs_exist() -> None:
    names = {c.name for c in CONFIGS}
    assert {"gpt2-tiny-cpu.yaml", "gpt2-tiny-cpu-ddp.yaml", "gpt2-small-gpu.yaml", "gpt2-small-gpu-ddp.yaml"} <= names


# -- the CLI end to end --------------------------------------------------------------------
def read_metrics(path: Path) -> tuple[list[float], list[tuple[float, float]]]:
    """(train_loss per step, [(val_loss, val_ppl)]) from a CSVLogger metrics.csv."""
    rows = list(csv.DictReader(path.open()))
    train = [(int(r["step"]), float(r["train_loss"])) for r in rows if r.get("train_loss")]
    val = [(float(r["val_loss"]), float(r["val_ppl"])) for r in rows if r.get("val_loss")]
    return [loss for _, loss in sorted(train)], val


@pytest.mark.multiprocess
@pytest.mark.timeout(300)
def test_cli_trains_and_checkpoints(tmp_path: Path) -> None:
    cmd = [sys.executable, "examples/train_gpt2.py", "fit", "--config", str(TINY.relative_to(REPO)),
           f"--trainer.max_steps={CLI_STEPS}", f"--trainer.default_root_dir={tmp_path}",
           f"--trainer.logger.init_args.save_dir={tmp_path}", "--trainer.log_every_n_steps=1",
           f"--trainer.val_check_interval={CLI_STEPS}", "--trainer.limit_val_batches=2", "--data.max_bytes=1000000"]
    log = tmp_path / "run.log"
    with log.open("wb") as out:
        proc = subprocess.run(cmd, cwd=REPO, env=child_env(), stdout=out, stderr=subprocess.STDOUT,
                              timeout=CLI_TIMEOUT_S, check=False)
    output = log.read_text(errors="replace")
    assert proc.returncode == 0, output[-6000:]
    assert "holograd/compression" in output and "train_loss" in output  # the progress bar

    run_dir = tmp_path / "holograd" / "version_0"
    losses, val = read_metrics(run_dir / "metrics.csv")
    assert len(losses) == CLI_STEPS, losses
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < first - LOSS_DROP, f"loss did not go down enough: first 5 {first:.3f}, last 5 {last:.3f}"
    assert len(val) == 1 and math.isclose(val[0][1], math.exp(val[0][0]), rel_tol=1e-4)

    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert checkpoint["global_step"] == CLI_STEPS
    state = checkpoint[STATE_KEY]
    assert state["config"]["num_directions"] == 4096
    assert state["exchange"]["chain"]["step"] == CLI_STEPS
    assert state["exchange"]["traffic"]["steps"] == CLI_STEPS

