"""Every byte the product reads or writes.

- dtypes: the safetensors dtype table and Hugging Face's weight file names.
- reader: ``CheckpointReader`` (folders, files, shard indexes; validated; pread, row and column blocks).
- writer: ``SafetensorsWriter`` (headers first, pwrite at fixed offsets, from any thread or process).
- transaction: ``OutputTransaction`` (lock, temporary, fsync, atomic swap, recovery).
- hashing: the one content identity of a model (``content_hash``) and its cache.
- scratch: ``ScratchStore``, fp32 tensors between passes, in RAM or in a file.
- adapters: ``AdapterReader`` (a PEFT LoRA folder read as the model it describes) and ``open_model``.
"""

from ._fs import fsync_path
from .adapters import AdapterReader, is_adapter, open_model
from .dtypes import DTYPES, SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME, dtype_to_str
from .hashing import content_hash, hash_algorithm, hash_tensors, legacy_hash, same_model
from .reader import CheckpointReader, TensorInfo
from .scratch import ScratchFile, ScratchPart, ScratchStore
from .transaction import OutputTransaction, needs_recovery, recover_output
from .writer import SafetensorsWriter, WriteTargets, write_into

__all__ = [
    "CheckpointReader",
    "TensorInfo",
    "AdapterReader",
    "open_model",
    "is_adapter",
    "SafetensorsWriter",
    "WriteTargets",
    "write_into",
    "OutputTransaction",
    "recover_output",
    "needs_recovery",
    "content_hash",
    "hash_tensors",
    "legacy_hash",
    "hash_algorithm",
    "same_model",
    "ScratchStore",
    "ScratchFile",
    "ScratchPart",
    "DTYPES",
    "dtype_to_str",
    "SAFE_WEIGHTS_NAME",
    "SAFE_WEIGHTS_INDEX_NAME",
    "fsync_path",
]
