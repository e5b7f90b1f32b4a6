"""build_task: the config's [model]/[data] keys are checked, build_task's own arguments are not."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from subnetdp.app.builders import build_task
from subnetdp.app.config import ConfigError, load_config


def _text_config(tmp_path: Path, extra: str = "") -> Path:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("To be, or not to be, that is the question.\n" * 40)
    path = tmp_path / "c.toml"
    path.write_text(f'[model]\nname = "llama"\npreset = "debug"\n'
                    f'[data]\nname = "text"\nsource = "{corpus}"\nseq_len = 16\nbatch_size = 2\n{extra}')
    return path


def test_text_data_gets_the_run_folder_and_saves_its_tokenizer_there(tmp_path: Path) -> None:
    out = tmp_path / "run"
    out.mkdir()
    task = build_task(load_config(_text_config(tmp_path)), out)
    assert task.kind == "lm" and task.data.seq_len == 16
    assert (out / "tokenizer.json").exists()
    again = build_task(load_config(_text_config(tmp_path)), out)  # a resumed run reuses it
    assert again.data.vocab_size == task.data.vocab_size
    assert build_task(load_config(_text_config(tmp_path))).data.vocab_size == task.data.vocab_size


def test_internal_builder_arguments_are_not_config_keys(tmp_path: Path) -> None:
    message = ("unknown key in [data] for 'text': 'out'; valid: batch_size, source, tokenizer, vocab_size, "
               "seq_len, val_fraction")
    with pytest.raises(ConfigError, match=re.escape(message)):
        build_task(load_config(_text_config(tmp_path, 'out = "elsewhere"\n')), tmp_path)
