"""Open a Hugging Face checkpoint directory from its headers alone, and check it.

Only ``config.json``, the index and each shard's safetensors header are read here: the
plan is built from these, and every problem that can be found without the tensor data
(missing or truncated shards, paths that leave SOURCE, overlapping or out-of-range
offsets, unknown dtypes, an index that disagrees with a shard) is an InputError before
any work starts.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import posixpath
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from nvfp4_ray.errors import InputError
from nvfp4_ray.formats.fp8_block import check_source_config
from nvfp4_ray.io.safetensors_format import TensorEntry, header_length, parse_header
from nvfp4_ray.io.storage import FileInfo, Store

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
# Files copied next to the output (tokenizer, processor, chat template, generation config,
# licence): anything small at the top level with one of these suffixes, minus the names below.
_COPIED_SUFFIXES = (".json", ".jinja", ".txt", ".model", ".tiktoken", ".md", ".py")
_NOT_COPIED = {CONFIG_NAME, INDEX_NAME, "manifest.json", "recipe.yaml", "_SUCCESS", "quality.json"}
_SHARD_NAME = re.compile(r"^[A-Za-z0-9_.\-]+\.safetensors$")
# The first read of a shard fetches this much: the 8-byte length and, almost always, the
# whole header, so a shard costs one request. Larger headers take a second one.
_HEADER_READ = 256 << 10


@dataclass(frozen=True)
class SourceTensor:
    file: str
    entry: TensorEntry

    @property
    def name(self) -> str:
        return self.entry.name


@dataclass(frozen=True)
class SourceCheckpoint:
    store: Store
    config: dict
    config_bytes: bytes
    files: dict[str, FileInfo]  # shard file name -> size and identity
    tensors: dict[str, SourceTensor]
    copied_files: dict[str, FileInfo]  # tokenizer & co, copied byte for byte


def open_checkpoint(url: str) -> SourceCheckpoint:
    store = Store(url)
    if not store.exists(""):
        raise InputError(f"SOURCE {store.display()} does not exist")
    # One listing gives every file's size and identity (one request on an object store).
    listing = store.list_infos("")
    if CONFIG_NAME not in listing:
        raise InputError(f"SOURCE {store.display()} is not a Hugging Face checkpoint: it has no config.json")
    config_bytes = store.read_bytes(CONFIG_NAME)
    config = _parse_config(config_bytes, store)
    shard_names, weight_map = _shard_names(store, listing)
    infos = {name: listing[name] for name in shard_names}
    with ThreadPoolExecutor(min(16, len(shard_names))) as pool:
        headers = dict(zip(shard_names, pool.map(lambda n: read_header(store, n, infos[n].size), shard_names)))
    tensors: dict[str, SourceTensor] = {}
    for file_name, entries in headers.items():
        for name, entry in entries.items():
            if name in tensors:
                raise InputError(f"tensor {name!r} appears in both {tensors[name].file} and {file_name}")
            tensors[name] = SourceTensor(file=file_name, entry=entry)
    if weight_map is not None:
        for name, file_name in weight_map.items():
            found = tensors.get(name)
            if found is None or found.file != file_name:
                where = f"is in {found.file}" if found else "is in no shard"
                raise InputError(f"{INDEX_NAME} maps {name!r} to {file_name}, but it {where}; the index or the shard is corrupt")
    copied = {
        name: info
        for name, info in listing.items()
        if name.endswith(_COPIED_SUFFIXES) and name not in _NOT_COPIED and not name.startswith(".")
    }
    return SourceCheckpoint(store, config, config_bytes, infos, tensors, copied)


def with_config_overrides(source: SourceCheckpoint, overrides: list[str]) -> tuple[SourceCheckpoint, list[str]]:
    """The checkpoint as if its config.json had the given KEY=VALUE edits (dotted keys into
    nested objects; VALUE is JSON, or else a plain string). Parents must exist; a key that
    config.json lacks is added, and named in the returned notes (a typo adds one too)."""
    if not overrides:
        return source, []
    config = json.loads(source.config_bytes)
    notes = []
    for override in overrides:
        key, _, raw = override.partition("=")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        *parents, leaf = key.split(".")
        target = config
        for part in parents:
            target = target.get(part) if isinstance(target, dict) else None
            if not isinstance(target, dict):
                raise InputError(f"config override {override!r}: config.json has no object at {'.'.join(parents)}")
        if leaf not in target:
            close = difflib.get_close_matches(leaf, [k for k in target if isinstance(k, str)], n=1)
            hint = f" (did you mean {'.'.join([*parents, close[0]])!r}?)" if close else ""
            notes.append(f"config override {override!r} adds {key!r}, which config.json does not have{hint}")
        target[leaf] = value
    data = (json.dumps(config, indent=2) + "\n").encode("utf-8")
    return dataclasses.replace(source, config=_parse_config(data, source.store), config_bytes=data), notes


def _parse_config(data: bytes, store: Store) -> dict:
    try:
        config = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise InputError(f"{store.display(CONFIG_NAME)} is not valid JSON: {exc}") from None
    if not isinstance(config, dict) or not isinstance(config.get("model_type"), str):
        raise InputError(f"{store.display(CONFIG_NAME)} has no 'model_type'; is SOURCE a transformers checkpoint?")
    if "quantization_config" in config:  # only FP8 with block scales, dequantized as it is read
        check_source_config(config["quantization_config"])
    return config


def _shard_names(store: Store, listing: dict[str, FileInfo]) -> tuple[list[str], dict[str, str] | None]:
    if INDEX_NAME in listing:
        try:
            index = json.loads(store.read_text(INDEX_NAME))
            weight_map = index["weight_map"]
            if not isinstance(weight_map, dict):
                raise TypeError
        except (ValueError, KeyError, TypeError, RecursionError):
            raise InputError(f"{store.display(INDEX_NAME)} is not a valid index: it needs a 'weight_map' object") from None
        for name, file_name in weight_map.items():
            _check_shard_name(file_name, name)
        names = sorted(set(weight_map.values()))
        for file_name in names:
            if file_name not in listing:
                raise InputError(f"{INDEX_NAME} names shard {file_name!r}, which is missing from SOURCE")
        return names, weight_map
    if SINGLE_NAME in listing:
        return [SINGLE_NAME], None
    raise InputError(
        f"SOURCE {store.display()} has no {SINGLE_NAME} or {INDEX_NAME}: only safetensors checkpoints are supported"
    )


def _check_shard_name(file_name: object, tensor: str) -> None:
    """Index entries must be plain file names inside SOURCE: no paths, no URLs, no '..'."""
    if (
        not isinstance(file_name, str)
        or not _SHARD_NAME.match(file_name)
        or file_name in (".safetensors", "..safetensors")
        or posixpath.basename(file_name) != file_name
        or file_name.startswith("..")
    ):
        raise InputError(
            f"{INDEX_NAME} maps {tensor!r} to {file_name!r}: shard names must be plain file names "
            "inside SOURCE (no directories, absolute paths, '..' or URLs)"
        )


def read_header(store: Store, file_name: str, size: int) -> dict[str, TensorEntry]:
    where = store.display(file_name)
    head = store.read_bytes(file_name, 0, min(size, _HEADER_READ))
    length = header_length(head, size, where)
    if 8 + length > len(head):
        head += store.read_bytes(file_name, len(head), 8 + length)
    header = parse_header(head[8 : 8 + length], size, where)
    return header.entries
