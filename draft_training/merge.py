"""merge: a run's trained draft as a plain dense HF folder, loadable by transformers and vLLM.

The adapter folds into the dense weights (W0 + s·B·A), which is exact only once λ = 0, so a
run stopped before the end of annealing is refused. The saved folder is loaded back and its
logits compared with the unmerged model's on samples of the run's data: the report's
`max_abs_logit_diff` must be at float rounding level.

Beside the weights goes `draft_vocab.json` (`afa_serve.engine.draft_vocab`): the target tokens
of the run's training responses by frequency, from which the torch engine trims the draft's
head. The checkpoint itself keeps the whole vocabulary. A run that trained the head's most
frequent rows only (`fit --head-rows N`) leaves the other rows as the initial draft had them,
stale against the trained layers: an engine scoring the whole head would propose their tokens
(measured on the default mission's draft: held-out agreement 0.086 over the whole head against
0.288 over the trained rows; bench/results/head_rows_whole_head.json). The merged head is untied
from the input embeddings and those rows are zeroed, so their logit is 0, below the trained
rows' top logits, and the whole head proposes what the trained rows do.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from afa_serve.atomic import atomic_directory
from afa_serve.engine.draft_forward import FeatureDraftForward
from afa_serve.engine.draft_vocab import count_tokens, write_draft_vocab
from afa_serve.engine.feature_draft import FeatureDraft
from afa_serve.models.resolve import resolve_model
from draft_training.afa_lora import merge
from draft_training.agreement import DEFAULT_K
from draft_training.examples import Batch, collate, load_examples, response_token_ids
from draft_training.feature_training import FeatureDraftLM
from draft_training.head_rows import HeadRows
from draft_training.run import FitConfig, Method, read_config, trained_model, untie_head

SAMPLE_EXAMPLES = 4
SAMPLE_LENGTH = 64


class MergeRefusedError(ValueError):
    """The run's adapter is not linear yet (λ > 0): merging would change what it computes."""


@dataclass(frozen=True)
class MergeReport:
    out: Path
    method: Method
    step: int  # completed optimiser steps of the merged weights
    max_abs_logit_diff: float  # merged folder vs unmerged model, on samples of the run's data


def merge_run(run_dir: Path, out: Path, overwrite: bool = False) -> MergeReport:
    config = read_config(run_dir)
    model, weights = trained_model(run_dir)
    if isinstance(model, FeatureDraftLM):
        return _save_feature_draft(config, model, weights.step, out, overwrite)
    if weights.lam > 0.0:
        raise MergeRefusedError(
            f"refusing to merge {run_dir}: its weights (step {weights.step}) were trained at "
            f"λ = {weights.lam:g} > 0, before the end of annealing; resume the run to its end"
        )
    samples = _samples(config)
    with torch.no_grad():
        unmerged_logits = model(
            input_ids=samples.input_ids, attention_mask=samples.attention_mask
        ).logits
    merge(model)
    vocab = count_tokens(response_token_ids(config.data))
    trained_rows = torch.arange(unmerged_logits.shape[-1])
    if config.head_rows:
        trained_rows = HeadRows.first_of(vocab, config.head_rows, len(trained_rows)).token_ids
        _zero_untrained_head_rows(model, trained_rows)
    tokenizer = AutoTokenizer.from_pretrained(resolve_model(config.draft))
    with atomic_directory(out, overwrite=overwrite) as folder:
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        write_draft_vocab(folder, vocab)
        merged = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        with torch.no_grad():
            merged_logits = merged(
                input_ids=samples.input_ids, attention_mask=samples.attention_mask
            ).logits
    mask = samples.attention_mask.bool()
    difference = ((merged_logits - unmerged_logits)[mask][:, trained_rows]).abs().max().item()
    return MergeReport(out, config.method, weights.step, difference)


def _zero_untrained_head_rows(model: torch.nn.Module, trained_rows: torch.Tensor) -> None:
    """Zero the head's rows outside `trained_rows`, in a head untied from the input embeddings
    (which keep every row as trained)."""
    untie_head(model)
    head = model.get_output_embeddings()
    untrained = torch.ones(head.weight.shape[0], dtype=torch.bool)
    untrained[trained_rows] = False
    with torch.no_grad():
        head.weight[untrained] = 0.0


def _save_feature_draft(config: FitConfig, model: FeatureDraftLM, step: int, out: Path,
                        overwrite: bool) -> MergeReport:
    """A feature draft has no adapter to fold: its folder (vLLM's EAGLE format) is written,
    read back into the engine's own forward, and that forward's logits, one drafted position
    at a time as the decoder runs it, compared with the trained module's on samples."""
    with atomic_directory(out, overwrite=overwrite) as folder:
        model.draft.save(folder)
        write_draft_vocab(folder, count_tokens(response_token_ids(config.data)))
        served = FeatureDraftForward(
            FeatureDraft.load(folder, torch.float32, torch.device("cpu")), model.target)
        difference = _served_difference(model, served, _samples(config))
    return MergeReport(out, config.method, step, difference)


def _samples(config: FitConfig) -> Batch:
    """The first examples of the run's data, on which a merged draft is checked."""
    return collate(
        load_examples(config.data, SAMPLE_LENGTH)[:SAMPLE_EXAMPLES], torch.device("cpu")
    )


@torch.no_grad()
def _served_difference(model: FeatureDraftLM, served: FeatureDraftForward,
                       samples: Batch) -> float:
    """Max |logit difference| between the training module and the engine's steps: at every
    row, its first drafted token (the target's feature) and the `DEFAULT_K` − 1 drafted after
    it (the draft's own features), each from the cache the decoder would hold."""
    output = model(input_ids=samples.input_ids, attention_mask=samples.attention_mask,
                   positions=DEFAULT_K)
    trained = [model.get_output_embeddings()(hidden) for hidden in output.drafted]
    features = output.target_features
    difference = 0.0
    for row, length in enumerate(samples.attention_mask.sum(dim=1).tolist()):
        tokens = samples.input_ids[row].tolist()
        cache = served.new_cache()
        for position in range(1, length):
            logits, own = served.step(cache, [tokens[position]], features[row, position - 1][None])
            difference = max(difference, (logits - trained[0][row, position]).abs().max().item())
            drafted_rows = range(position + 1, min(position + DEFAULT_K, length))
            for drafted, drafted_row in enumerate(drafted_rows, start=1):
                logits, own = served.step(cache, [tokens[drafted_row]], own[None])
                difference = max(difference,
                                 (logits - trained[drafted][row, drafted_row]).abs().max().item())
            cache.crop(position)  # rows 1..position: the accepted prefix
    return difference
