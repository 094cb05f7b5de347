"""MiniLM on a local registry: the published version folder is a transformers model folder."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers
from transformers import BertModel, BertTokenizer

from pipeline.execution.importer import import_checkpoint
from pipeline.execution.job import run_workflow
from pipeline.models.bert import minilm_path
from pipeline.models.spec import load_spec
from pipeline.registry import Registry
from pipeline.workflow import load_workflow
from tests.execution.helpers import SPECS, WORKERS, wait_for_started_workers, write_workflow

ORIGINAL_VOCAB_SIZE = 30522
ADDED_TOKENS = 100
# Texts made only of words that the added clinical tokens do not change, so both
# vocabularies give the same token ids.
TEXTS = [
    "The patient was admitted to the hospital with chest pain.",
    "A quick brown fox jumps over the lazy dog.",
    "Sentence embeddings map similar meanings to nearby vectors.",
]


@pytest.fixture(scope="module")
def minilm_version(tmp_path_factory, session_client, cluster):
    """The packaged all-MiniLM-L6-v2 imported locally and migrated by minilm-domain-tokens."""
    wait_for_started_workers(session_client, cluster, WORKERS)
    folder = tmp_path_factory.mktemp("minilm-local")
    registry = Registry(f"file://{folder}/registry")
    import_checkpoint(str(minilm_path() / "model.safetensors"), load_spec(SPECS / "minilm-v1.yaml"), registry, "minilm")
    workflow = load_workflow(write_workflow(folder / "minilm.yaml", "minilm-domain-tokens", registry.url))
    result = run_workflow(workflow, session_client)
    published = registry.get("minilm-domain-tokens", result.results[0].version)
    folder = Path(published.url.removeprefix("file://"))
    return published, folder


def mean_pooled(model: BertModel, encoded: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        hidden = model(**encoded).last_hidden_state
    weights = encoded["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1)


def test_version_folder_loads_with_from_pretrained(minilm_version):
    published, folder = minilm_version
    assert transformers.utils.SAFE_WEIGHTS_INDEX_NAME in published.manifest.files
    assert published.verify().ok

    model, info = BertModel.from_pretrained(str(folder), output_loading_info=True)

    assert info["missing_keys"] == set() or info["missing_keys"] == []
    assert not info["unexpected_keys"]
    assert not info["mismatched_keys"]
    assert model.config.vocab_size == ORIGINAL_VOCAB_SIZE + ADDED_TOKENS
    assert model.embeddings.word_embeddings.weight.shape[0] == ORIGINAL_VOCAB_SIZE + ADDED_TOKENS


def test_sentence_embeddings_match_original(minilm_version):
    _, folder = minilm_version
    original = BertModel.from_pretrained(str(minilm_path())).eval()
    migrated = BertModel.from_pretrained(str(folder)).eval()
    old_tokenizer = BertTokenizer(str(minilm_path() / "vocab.txt"))
    new_tokenizer = BertTokenizer(str(folder / "vocab.txt"))

    old_encoded = old_tokenizer(TEXTS, padding=True, return_tensors="pt")
    new_encoded = new_tokenizer(TEXTS, padding=True, return_tensors="pt")

    assert torch.equal(new_encoded["input_ids"], old_encoded["input_ids"])
    difference = (mean_pooled(migrated, new_encoded) - mean_pooled(original, old_encoded)).abs().max()
    assert float(difference) <= 1e-5


def test_added_tokens_start_at_mean_embedding(minilm_version):
    _, folder = minilm_version
    original = BertModel.from_pretrained(str(minilm_path()))
    migrated = BertModel.from_pretrained(str(folder))
    new_tokenizer = BertTokenizer(str(folder / "vocab.txt"))

    ids = new_tokenizer("pharmacokinetics")["input_ids"]

    assert ids == [new_tokenizer.cls_token_id, ORIGINAL_VOCAB_SIZE, new_tokenizer.sep_token_id]
    old_rows = original.embeddings.word_embeddings.weight.detach()
    new_rows = migrated.embeddings.word_embeddings.weight.detach()
    torch.testing.assert_close(new_rows[:ORIGINAL_VOCAB_SIZE], old_rows, rtol=0, atol=0)
    expected = old_rows.mean(dim=0).expand(ADDED_TOKENS, -1)
    torch.testing.assert_close(new_rows[ORIGINAL_VOCAB_SIZE:], expected, rtol=1e-5, atol=1e-6)
