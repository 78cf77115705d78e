"""Carry the packaged target and a trained draft to a GPU machine that reaches no registry.

Neither model travels as an HF folder. The target goes as its GGUF (93 MB) and is converted
there; the draft goes as the tensors in which it differs from a truncated copy of the target (a
trained 2-layer draft: its layers, ~14 MB in bf16, plus its embeddings where it trained them,
57 MB) with its `draft_vocab.json`, and is rebuilt there with afa-train's own
`truncated_draft`. `bench/gpu/carry.sh` splits the folder into pieces a device call can carry.

    here:   python bench/gpu/models.py export --target T --draft D --gguf G --out .gpu/payload
    there:  python bench/gpu/models.py build --carried DIR... --out /root/models

`build` also files the target in afa-serve's model cache as if pulled, so the packaged name
`smollm2-135m-instruct` (the tests' `real_model_path`) resolves there without a registry.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from afa_serve.engine.draft_vocab import FILE_NAME as DRAFT_VOCAB_FILE
from afa_serve.models.cache import PULL_RECORD, model_folder
from afa_serve.models.convert import convert_gguf_to_hf
from afa_serve.models.pull import assemble_gguf
from afa_serve.models.registry import packaged_model
from draft_training.init_draft import truncated_draft

MODEL = "smollm2-135m-instruct"
GGUF = "target.gguf"
DRAFT_TENSORS = "draft_delta.safetensors"
DRAFT_META = "draft.json"


def export(target: Path, draft: Path, gguf: Path, out: Path) -> None:
    """Write the GGUF, the draft's tensors that differ from the target's and its head's
    vocabulary."""
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(gguf, out / GGUF)
    if (draft / DRAFT_VOCAB_FILE).is_file():
        shutil.copyfile(draft / DRAFT_VOCAB_FILE, out / DRAFT_VOCAB_FILE)
    target_state = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32).state_dict()
    draft_model = AutoModelForCausalLM.from_pretrained(draft, dtype=torch.float32)
    tied = {"lm_head.weight"} if draft_model.config.tie_word_embeddings else set()
    changed = {name: tensor.to(torch.bfloat16).contiguous()
               for name, tensor in draft_model.state_dict().items()
               if name not in tied and not torch.equal(tensor, target_state[name])}
    save_file(changed, out / DRAFT_TENSORS)
    meta = {"num_layers": draft_model.config.num_hidden_layers, "draft": str(draft)}
    (out / DRAFT_META).write_text(json.dumps(meta))
    print(f"{len(changed)} draft tensors differ from the target's; written to {out}")


def build(carried: list[Path], out: Path) -> None:
    """Assemble and check the GGUF, convert it, and rebuild the draft beside it."""
    files = {path.name: path for folder in carried for path in folder.iterdir()}
    out.mkdir(parents=True, exist_ok=True)
    gguf = assemble_gguf([files[GGUF]], packaged_model(MODEL).gguf_sha256, out)  # checks sha256
    convert_gguf_to_hf(gguf, out / "target")
    cached = model_folder(MODEL)
    cached.parent.mkdir(parents=True, exist_ok=True)
    if cached.is_dir() and not cached.is_symlink():
        shutil.rmtree(cached)
    cached.unlink(missing_ok=True)
    cached.symlink_to((out / "target").resolve())
    (out / "target" / PULL_RECORD).write_text(json.dumps({"name": MODEL, "carried": True}))
    target = AutoModelForCausalLM.from_pretrained(out / "target", dtype=torch.float32)
    meta = json.loads(files[DRAFT_META].read_text())
    draft = truncated_draft(target, meta["num_layers"])
    changed = {name: t.float() for name, t in load_file(files[DRAFT_TENSORS]).items()}
    draft.load_state_dict({**draft.state_dict(), **changed})
    draft.save_pretrained(out / "draft")
    AutoTokenizer.from_pretrained(out / "target").save_pretrained(out / "draft")
    if DRAFT_VOCAB_FILE in files:
        shutil.copyfile(files[DRAFT_VOCAB_FILE], out / "draft" / DRAFT_VOCAB_FILE)
    print(f"target and draft ({meta['num_layers']} layers, {len(changed)} trained tensors) "
          f"in {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    ex = commands.add_parser("export")
    ex.add_argument("--target", type=Path, required=True)
    ex.add_argument("--draft", type=Path, required=True)
    ex.add_argument("--gguf", type=Path, required=True)
    ex.add_argument("--out", type=Path, required=True)
    bu = commands.add_parser("build")
    bu.add_argument("--carried", type=Path, nargs="+", required=True)
    bu.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    if args.command == "export":
        export(args.target, args.draft, args.gguf, args.out)
    else:
        build(args.carried, args.out)


if __name__ == "__main__":
    main()
