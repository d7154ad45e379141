"""Local Hugging Face folders and texts: ``load_folder(path) -> nn.Module``, ``text_inputs(...)``.

A Hugging Face model folder holds ``config.json`` and the weights. It is loaded with the class
named by the config's ``architectures`` (``BertModel``, ``GPT2LMHeadModel``, ``LlamaForCausalLM``,
found as ``getattr(transformers, name)``; ``AutoModel`` otherwise), with
``from_pretrained(folder, local_files_only=True, use_safetensors=True, trust_remote_code=False)``:
nothing is downloaded and no code from the folder runs. The weights are read from safetensors
only; a folder holding only a pickle (``pytorch_model.bin``) is refused, since unpickling could
execute code.

Texts become ids and attention masks ``(n, 2, T)`` with a tokenizer (a ``transformers`` tokenizer
object or a local folder; by default the model folder's own). Every text is tokenized on its own
(special tokens included, truncated to the model's maximum positions) and padded on the right to
the longest one: ``[:, 0]`` the ids (the tokenizer's pad id at padding, 0 without one), ``[:, 1]``
the mask (1 at real tokens). The task's model is then a copy that takes that one tensor
(`workbench.zoo.masked_text.with_attention_mask`), so every part of the workbench still calls
``model(inputs)`` with one tensor per batch while the model attends only to real tokens.

``transformers`` is an optional dependency, imported only here and only when used.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from workbench.errors import WorkbenchError
from workbench.zoo.masked_text import check_takes_attention_mask

#: files a folder's tokenizer may be saved as (any one is enough for ``AutoTokenizer``)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json",
                   "tokenizer.model", "spiece.model")


def _transformers():
    try:
        import transformers  # noqa: PLC0415 (optional heavy dependency)
    except ImportError:
        raise WorkbenchError("loading a Hugging Face folder or texts needs the transformers package: "
                             "pip install transformers") from None
    return transformers


def is_model_folder(path: Path) -> bool:
    """Whether ``path`` is a directory holding ``config.json`` (a Hugging Face model folder)."""
    return path.is_dir() and (path / "config.json").is_file()


def _check_weights(folder: Path) -> None:
    """Refuse a folder whose weights are not in safetensors (a pickle, or none at all)."""
    if any(folder.glob("*.safetensors")) or (folder / "model.safetensors.index.json").is_file():
        return
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
    if pickles:
        raise WorkbenchError(
            f"refused to load {folder}: its weights are only in {', '.join(pickles)} (a pickle, which could run "
            "code when loaded); the workbench reads safetensors only. Convert it where you trust the file: "
            "AutoModel.from_pretrained(folder).save_pretrained(folder, safe_serialization=True)")
    raise WorkbenchError(f"{folder} has a config.json but no weights (no model.safetensors)")


def load_folder(folder: Path) -> nn.Module:
    """The model of a local Hugging Face folder, in eval mode (see the module docstring).

    Raises `WorkbenchError` for a folder without ``config.json``, weights that are not
    safetensors, or a config ``transformers`` cannot build.
    """
    folder = Path(folder)
    if not is_model_folder(folder):
        present = ", ".join(sorted(p.name for p in folder.iterdir())[:10]) if folder.is_dir() else "nothing"
        raise WorkbenchError(f"{folder} is a folder but not a Hugging Face model folder: it has no config.json "
                             f"(it holds: {present or 'nothing'}); give a model file or a folder written by "
                             "save_pretrained")
    _check_weights(folder)
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise WorkbenchError(f"{folder / 'config.json'} is not readable JSON: {exc}") from None
    transformers = _transformers()
    names = (config.get("architectures") or []) if isinstance(config, dict) else []
    cls = next((getattr(transformers, n) for n in names if isinstance(n, str) and hasattr(transformers, n)),
               transformers.AutoModel)
    try:
        model = cls.from_pretrained(str(folder), local_files_only=True, use_safetensors=True,
                                    trust_remote_code=False)
    except Exception as exc:  # noqa: BLE001  (transformers raises OSError, ValueError, KeyError, ...)
        raise WorkbenchError(f"{folder} cannot be loaded with {cls.__name__}: "
                             f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}") from None
    return model.eval()


# ---- texts -------------------------------------------------------------------------------------

def read_texts(texts: Any) -> list[str]:
    """A list of texts from a list/tuple of strings or the path of a ``.txt`` file (one text per
    line, blank lines skipped)."""
    if isinstance(texts, (str, Path)):
        path = Path(texts)
        if not path.is_file():
            raise WorkbenchError(f"texts={str(texts)!r} is not a file; give a list of strings or the path "
                                 "of a .txt file with one text per line")
        texts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        source = f" in {path}"
    else:
        source = ""
    if not isinstance(texts, (list, tuple)) or not all(isinstance(t, str) for t in texts):
        raise WorkbenchError(f"texts must be a list of strings or a .txt path; got {type(texts).__name__}")
    if not texts:
        raise WorkbenchError(f"texts holds no text{source}")
    return list(texts)


def resolve_tokenizer(tokenizer: Any, folder: Path | None) -> Any:
    """A tokenizer object: ``tokenizer`` itself, one loaded from a local folder path, or (None) the
    model folder's own when it holds tokenizer files."""
    if tokenizer is None:
        if folder is None or not any((folder / name).is_file() for name in TOKENIZER_FILES):
            where = f"the model folder {folder} holds none" if folder is not None else "the model is not a folder"
            raise WorkbenchError(f"texts= needs tokenizer= (a transformers tokenizer or a local tokenizer folder); "
                                 f"{where}")
        tokenizer = folder
    if isinstance(tokenizer, (str, Path)):
        path = Path(tokenizer)
        if not path.is_dir():
            raise WorkbenchError(f"tokenizer={str(tokenizer)!r} is not a local folder (nothing is downloaded)")
        try:
            return _transformers().AutoTokenizer.from_pretrained(str(path), local_files_only=True,
                                                                 trust_remote_code=False)
        except Exception as exc:  # noqa: BLE001  (transformers raises many types)
            raise WorkbenchError(f"no tokenizer can be loaded from {path}: "
                                 f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}") from None
    if not callable(tokenizer) or not hasattr(tokenizer, "__len__"):
        raise WorkbenchError(f"tokenizer must be a transformers tokenizer or a folder path; got {type(tokenizer).__name__}")
    return tokenizer


def model_vocab_size(model: nn.Module) -> int | None:
    """Rows of the model's token embedding: ``config.vocab_size``, else its input embedding's size."""
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if isinstance(vocab, int):
        return vocab
    embeddings = getattr(model, "get_input_embeddings", None)
    table = embeddings() if callable(embeddings) else None
    return table.num_embeddings if isinstance(table, nn.Embedding) else None


def max_positions(model: nn.Module, tokenizer: Any) -> int | None:
    """The longest sequence the model takes: its config's position count, else the tokenizer's limit."""
    config = getattr(model, "config", None)
    for key in ("max_position_embeddings", "n_positions", "n_ctx", "max_seq_len"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    limit = getattr(tokenizer, "model_max_length", None)
    return limit if isinstance(limit, int) and 0 < limit < 1_000_000 else None


def text_inputs(texts: Any, tokenizer: Any, model: nn.Module, folder: Path | None = None) -> torch.Tensor:
    """Token ids and attention mask ``(n, 2, T)`` (int64) of ``texts`` for ``model``: ``T`` is the
    longest text's token count (after truncation to the model's maximum positions); shorter texts
    are padded on the right (ids: the tokenizer's ``pad_token_id``, else 0; mask: 0).

    Raises `WorkbenchError` when the tokenizer's vocabulary is larger than the model's
    (``len(tokenizer) > vocab_size``: its ids would index past the embedding), when a text has no
    token, or when the model's forward takes no ``attention_mask``.
    """
    texts = read_texts(texts)
    tokenizer = resolve_tokenizer(tokenizer, folder)
    vocab = model_vocab_size(model)
    if vocab is not None and len(tokenizer) > vocab:
        raise WorkbenchError(f"the tokenizer does not match the model: it has {len(tokenizer)} tokens but the "
                             f"model's vocabulary has {vocab} (vocab_size); use the model's own tokenizer")
    limit = max_positions(model, tokenizer)
    try:
        encoded = tokenizer(texts, truncation=limit is not None, max_length=limit)["input_ids"]
    except Exception as exc:  # noqa: BLE001  (the tokenizer decides what fails)
        raise WorkbenchError(f"the tokenizer cannot encode the texts: {type(exc).__name__}: "
                             f"{str(exc).splitlines()[0][:200] if str(exc) else ''}") from None
    empty = next((i for i, ids in enumerate(encoded) if not ids), None)
    if empty is not None:
        raise WorkbenchError(f"text {empty} ({texts[empty][:40]!r}) gives no token; remove it")
    check_takes_attention_mask(model)
    pad = getattr(tokenizer, "pad_token_id", None)
    out = torch.zeros(len(encoded), 2, max(map(len, encoded)), dtype=torch.long)
    out[:, 0] = pad if isinstance(pad, int) else 0
    for row, ids in enumerate(encoded):
        out[row, 0, :len(ids)] = torch.as_tensor(list(ids), dtype=torch.long)
        out[row, 1, :len(ids)] = 1
    return out
