"""Checkpoints of other codes, read into our models without TensorFlow: the original VDM
code's (:mod:`vdm_jax.pretrained.original`, e.g. the authors' released CIFAR-10 checkpoints)
and MuLAN's (:mod:`vdm_jax.pretrained.mulan`). Both read files only: no orbax, grain or
tensorflow_datasets.

    model, variables = vdm_jax.pretrained.load_original_checkpoint(path, params="ema")
    model, variables = vdm_jax.pretrained.load_mulan_checkpoint(path, params="ema")
"""

from vdm_jax.pretrained.mulan import (
    MuLANArchitecture,
    MuLANCheckpoint,
    build_mulan_model,
    convert_mulan_tree,
    infer_mulan_architecture,
    is_mulan_state,
    load_mulan_checkpoint,
    mulan_checkpoint,
)
from vdm_jax.pretrained.original import (
    OriginalArchitecture,
    OriginalCheckpoint,
    build_model,
    convert_tree,
    find_checkpoint_file,
    infer_architecture,
    load_original_checkpoint,
    original_checkpoint,
    read_original_checkpoint,
    read_train_state,
)

__all__ = [
    "MuLANArchitecture",
    "MuLANCheckpoint",
    "OriginalArchitecture",
    "OriginalCheckpoint",
    "build_model",
    "build_mulan_model",
    "convert_mulan_tree",
    "convert_tree",
    "find_checkpoint_file",
    "infer_architecture",
    "infer_mulan_architecture",
    "is_mulan_state",
    "load_mulan_checkpoint",
    "load_original_checkpoint",
    "mulan_checkpoint",
    "original_checkpoint",
    "read_original_checkpoint",
    "read_train_state",
]
